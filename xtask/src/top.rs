//! `cargo xtask top`: a live view of a running appliance, as `iostat` and
//! `htop` users expect. Over QMP (the socket `cargo xtask run` offers, or
//! `--qmp PATH`) it samples, every interval:
//!
//! - `query-blockstats` (backends: one per export, `qdev` is the export
//!   id; as in QEMU, nodes count no I/O of their own);
//! - `x-query-devices` (every disk and its `stats`: what its virtqueue saw,
//!   whichever node sent it);
//! - `query-block-exports` (its `x-clients` member: NBD clients connected);
//! - `query-jobs` (progress).
//!
//! From two samples it shows per export and per node the read/write
//! throughput, IOPS and mean latency over the interval (deltas of bytes,
//! operations and total times), and per job a progress bar, its speed over
//! the interval and the ETA at that speed. `--once` takes two samples an
//! interval apart and prints one view; with `--json` the same figures as
//! one JSON object, for scripts.

use clap::Args;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct TopArgs {
    /// The QMP socket of a running appliance.
    #[arg(long, default_value = "target/blockhaus/qmp.sock")]
    qmp: PathBuf,
    /// One view (two samples one interval apart), then exit.
    #[arg(long)]
    once: bool,
    /// Print JSON instead of the table (with --once: one object).
    #[arg(long)]
    json: bool,
    /// Seconds between samples.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
}

/// One round of queries.
struct Sample {
    at: Instant,
    backends: Value,
    disks: Value,
    exports: Value,
    jobs: Value,
}

fn sample(qmp: &mut harness::Qmp) -> Result<Sample, String> {
    Ok(Sample {
        backends: qmp.cmd("query-blockstats", json!({}))?,
        disks: qmp.cmd("x-query-devices", json!({}))?,
        exports: qmp.cmd("query-block-exports", json!({}))?,
        jobs: qmp.cmd("query-jobs", json!({}))?,
        at: Instant::now(),
    })
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// The I/O figures of one `BlockStats.stats` over `dt` seconds since
/// `old` (an entry missing before counts from zero).
fn io(new: &Value, old: Option<&Value>, dt: f64) -> Value {
    let zero = json!({});
    let old = old.unwrap_or(&zero);
    let d = |k: &str| u(new, k).saturating_sub(u(old, k));
    let rate = |n: u64| if dt > 0.0 { n as f64 / dt } else { 0.0 };
    // Mean latency of the operations completed in the interval.
    let lat_us = |time: &str, ops: &str| match d(ops) {
        0 => Value::Null,
        n => json!(d(time) as f64 / n as f64 / 1000.0),
    };
    json!({
        "rd_bytes": u(new, "rd_bytes"),
        "wr_bytes": u(new, "wr_bytes"),
        "rd_operations": u(new, "rd_operations"),
        "wr_operations": u(new, "wr_operations"),
        "rd_bytes_per_s": rate(d("rd_bytes")),
        "wr_bytes_per_s": rate(d("wr_bytes")),
        "rd_iops": rate(d("rd_operations")),
        "wr_iops": rate(d("wr_operations")),
        "rd_latency_us": lat_us("rd_total_time_ns", "rd_operations"),
        "wr_latency_us": lat_us("wr_total_time_ns", "wr_operations"),
    })
}

fn find<'v>(list: &'v Value, key: &str, value: &str) -> Option<&'v Value> {
    list.as_array()?
        .iter()
        .find(|e| e[key].as_str() == Some(value))
}

/// The view of two samples as JSON.
fn view(old: &Sample, new: &Sample) -> Value {
    let dt = new.at.duration_since(old.at).as_secs_f64();
    let mut exports = Vec::new();
    for e in new.exports.as_array().into_iter().flatten() {
        let id = e["id"].as_str().unwrap_or("");
        let stats = find(&new.backends, "qdev", id).map(|b| &b["stats"]);
        let before = find(&old.backends, "qdev", id).map(|b| &b["stats"]);
        let mut row = io(stats.unwrap_or(&Value::Null), before, dt);
        row["id"] = json!(id);
        row["node-name"] = e["node-name"].clone();
        row["clients"] = e["x-clients"].clone();
        exports.push(row);
    }
    let mut disks = Vec::new();
    for d in new.disks.as_array().into_iter().flatten() {
        let serial = d["serial"].as_str().unwrap_or("");
        let before = find(&old.disks, "serial", serial).map(|b| &b["stats"]);
        let mut row = io(&d["stats"], before, dt);
        row["serial"] = json!(serial);
        row["transport"] = d["transport"].clone();
        row["claimed-by"] = d["claimed-by"].clone();
        disks.push(row);
    }
    let mut jobs = Vec::new();
    for j in new.jobs.as_array().into_iter().flatten() {
        let id = j["id"].as_str().unwrap_or("");
        let (cur, total) = (u(j, "current-progress"), u(j, "total-progress"));
        let was = find(&old.jobs, "id", id).map_or(cur, |o| u(o, "current-progress"));
        let speed = if dt > 0.0 {
            cur.saturating_sub(was) as f64 / dt
        } else {
            0.0
        };
        let eta = (speed > 0.0).then(|| total.saturating_sub(cur) as f64 / speed);
        jobs.push(json!({
            "id": id,
            "type": j["type"],
            "status": j["status"],
            "current-progress": cur,
            "total-progress": total,
            "percent": if total > 0 { cur as f64 * 100.0 / total as f64 } else { 0.0 },
            "speed_bytes_per_s": speed,
            "eta_s": eta,
        }));
    }
    json!({"interval_s": dt, "exports": exports, "disks": disks, "jobs": jobs})
}

/// Two samples `interval` apart, as the JSON view `--once --json` prints.
pub fn once(qmp: &mut harness::Qmp, interval: Duration) -> Result<Value, String> {
    let first = sample(qmp)?;
    std::thread::sleep(interval);
    Ok(view(&first, &sample(qmp)?))
}

/// Connects to `socket` and negotiates.
pub fn connect(socket: &Path) -> Result<harness::Qmp, String> {
    let mut qmp = harness::Qmp::connect(socket, Duration::from_secs(2))
        .map_err(|e| format!("{}: {e} (is `cargo xtask run` up?)", socket.display()))?;
    qmp.negotiate()?;
    Ok(qmp)
}

fn human(bytes_per_s: f64) -> String {
    const UNITS: [&str; 4] = ["B/s", "KiB/s", "MiB/s", "GiB/s"];
    let mut v = bytes_per_s;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", UNITS[i])
}

fn lat(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |us| format!("{us:.0} us"))
}

fn io_line(label: &str, r: &Value) -> String {
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    format!(
        "{label:<28} {:>12} {:>12} {:>8.0} {:>8.0} {:>10} {:>10}",
        human(f("rd_bytes_per_s")),
        human(f("wr_bytes_per_s")),
        f("rd_iops"),
        f("wr_iops"),
        lat(&r["rd_latency_us"]),
        lat(&r["wr_latency_us"]),
    )
}

/// The view as text.
pub fn render(v: &Value) -> String {
    let mut out = format!(
        "{:<28} {:>12} {:>12} {:>8} {:>8} {:>10} {:>10}\n",
        "", "read", "write", "r IOPS", "w IOPS", "r lat", "w lat"
    );
    for e in v["exports"].as_array().into_iter().flatten() {
        let label = format!(
            "export {} ({} clients)",
            e["id"].as_str().unwrap_or(""),
            e["clients"].as_u64().unwrap_or(0)
        );
        out += &io_line(&label, e);
        out.push('\n');
    }
    for d in v["disks"].as_array().into_iter().flatten() {
        let label = format!(
            "disk {} [{}]",
            d["serial"].as_str().unwrap_or(""),
            d["transport"].as_str().unwrap_or("?")
        );
        out += &io_line(&label, d);
        out.push('\n');
    }
    let jobs = v["jobs"].as_array().map_or(&[][..], |j| j.as_slice());
    if !jobs.is_empty() {
        out.push('\n');
    }
    for j in jobs {
        let pct = j["percent"].as_f64().unwrap_or(0.0);
        let filled = ((pct / 100.0) * 30.0).round().clamp(0.0, 30.0) as usize;
        let eta = j["eta_s"]
            .as_f64()
            .map_or("ETA -".into(), |s| format!("ETA {s:.0} s"));
        out += &format!(
            "job {} {} {}: [{}{}] {pct:5.1}% {} {eta}\n",
            j["id"].as_str().unwrap_or(""),
            j["type"].as_str().unwrap_or(""),
            j["status"].as_str().unwrap_or(""),
            "#".repeat(filled),
            "-".repeat(30 - filled),
            human(j["speed_bytes_per_s"].as_f64().unwrap_or(0.0)),
        );
    }
    out
}

pub fn top(args: TopArgs) -> Result<(), String> {
    if !(args.interval > 0.0 && args.interval.is_finite()) {
        return Err(format!(
            "--interval {}: must be a positive number of seconds",
            args.interval
        ));
    }
    let interval = Duration::from_secs_f64(args.interval);
    let socket = harness::workspace_root().join(&args.qmp);
    let mut qmp = connect(&socket)?;
    if args.once {
        let v = once(&mut qmp, interval)?;
        if args.json {
            println!("{v}");
        } else {
            print!("{}", render(&v));
        }
        return Ok(());
    }
    let mut last = sample(&mut qmp)?;
    loop {
        std::thread::sleep(interval);
        let next = sample(&mut qmp)?;
        let v = view(&last, &next);
        if args.json {
            println!("{v}");
        } else {
            // Clear the screen, cursor home.
            print!("\x1b[2J\x1b[H{}", render(&v));
        }
        last = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(backends: Value, jobs: Value, at: Instant) -> Sample {
        Sample {
            at,
            backends,
            disks: json!([]),
            exports: json!([{"id": "e0", "node-name": "vblk", "x-clients": 2}]),
            jobs,
        }
    }

    #[test]
    fn rates_latency_and_eta_are_deltas_over_the_interval() {
        let t0 = Instant::now();
        let old = s(
            json!([{"qdev": "e0", "stats": {"rd_bytes": 1000, "rd_operations": 1, "rd_total_time_ns": 5000}}]),
            json!([{"id": "j", "type": "mirror", "status": "running", "current-progress": 100, "total-progress": 1000}]),
            t0,
        );
        let new = s(
            json!([{"qdev": "e0", "stats": {"rd_bytes": 5096, "rd_operations": 3, "rd_total_time_ns": 45000, "wr_bytes": 0}}]),
            json!([{"id": "j", "type": "mirror", "status": "running", "current-progress": 400, "total-progress": 1000}]),
            t0 + Duration::from_secs(2),
        );
        let v = view(&old, &new);
        let e = &v["exports"][0];
        assert_eq!(e["rd_bytes"], 5096);
        assert_eq!(e["rd_bytes_per_s"], 2048.0);
        assert_eq!(e["rd_iops"], 1.0);
        assert_eq!(e["rd_latency_us"], 20.0);
        assert_eq!(e["wr_latency_us"], Value::Null);
        assert_eq!(e["clients"], 2);
        let j = &v["jobs"][0];
        assert_eq!(j["speed_bytes_per_s"], 150.0);
        assert_eq!(j["eta_s"], 4.0);
        assert_eq!(j["percent"], 40.0);
        let text = render(&v);
        assert!(text.contains("export e0 (2 clients)"), "{text}");
        assert!(text.contains("2.0 KiB/s"), "{text}");
        assert!(
            text.contains("[############------------------]  40.0% 150.0 B/s ETA 4 s"),
            "{text}"
        );
    }

    /// `--once --json` against a booted appliance through a virtio-serial
    /// QMP port (as `run` sets it up), while qemu-io holds an NBD connection and writes: the
    /// figures are what qemu-io wrote.
    #[test]
    fn once_json_reports_what_qemu_io_wrote_over_nbd() {
        use harness::host::{MIB, create};
        use harness::qemu::free_port;
        use std::io::{BufRead, BufReader, Write};
        use std::process::{Command, Stdio};

        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        create(&disk, 16 * MIB);
        let port = free_port();
        let cfg = harness::QemuConfig {
            append: "--blockdev driver=virtio-blk,node-name=vblk,serial=disk0 \
                     --nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809 \
                     --export type=nbd,id=e0,node-name=vblk,name=disk,writable=on"
                .into(),
            disks: vec![disk],
            nbd_port: Some(port),
            com2: false,
            qmp_ports: 1,
            ..harness::QemuConfig::default()
        };
        let mut a = harness::Appliance::start(&harness::image::for_tests(), &cfg).unwrap();
        let sock = a.qmp_port_socket(0);
        let mut qmp = connect(&sock).unwrap();

        let mut io = Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(format!("nbd://127.0.0.1:{port}/disk"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("qemu-io runs");
        let mut stdin = io.stdin.take().unwrap();
        let mut stdout = BufReader::new(io.stdout.take().unwrap());
        let mut write = |cmd: &str, done: &str| {
            writeln!(stdin, "{cmd}").unwrap();
            let mut seen = String::new();
            while !seen.contains(done) {
                let mut line = String::new();
                assert!(stdout.read_line(&mut line).unwrap() > 0, "qemu-io: {seen}");
                seen += &line;
            }
        };
        write(
            "write -P 0x5a 0 4M",
            "wrote 4194304/4194304 bytes at offset 0",
        );

        let v = once(&mut qmp, Duration::from_secs(1)).unwrap();
        let e = &v["exports"][0];
        assert_eq!(e["id"], "e0", "{v}");
        assert_eq!(e["clients"], 1, "qemu-io is connected: {v}");
        assert_eq!(e["wr_bytes"], 4 * MIB, "{v}");
        assert_eq!(e["rd_bytes"], 0, "{v}");
        assert_eq!(
            e["wr_bytes_per_s"], 0.0,
            "nothing written in the interval: {v}"
        );
        let disk = &v["disks"][0];
        assert_eq!(disk["serial"], "disk0", "{v}");
        assert_eq!(disk["transport"], "virtio-blk", "{v}");
        assert_eq!(disk["claimed-by"], "vblk", "{v}");
        assert_eq!(
            disk["wr_bytes"],
            4 * MIB,
            "the disk saw the same bytes: {v}"
        );
        assert_eq!(disk["rd_bytes"], 0, "{v}");

        // A write inside the interval: its bytes over the interval's length.
        let before = sample(&mut qmp).unwrap();
        write(
            "write -P 0x5b 4M 2M",
            "wrote 2097152/2097152 bytes at offset 4194304",
        );
        let after = sample(&mut qmp).unwrap();
        let v = view(&before, &after);
        let e = &v["exports"][0];
        let dt = v["interval_s"].as_f64().unwrap();
        let rate = e["wr_bytes_per_s"].as_f64().unwrap();
        assert!((rate * dt - (2 * MIB) as f64).abs() < 1.0, "{v}");
        assert_eq!(e["wr_bytes"], 6 * MIB, "{v}");
        assert!(e["wr_iops"].as_f64().unwrap() > 0.0, "{v}");
        assert!(e["wr_latency_us"].as_f64().unwrap() > 0.0, "{v}");
        assert_eq!(e["rd_iops"], 0.0, "{v}");
        let disk = &v["disks"][0];
        assert_eq!(disk["wr_bytes"], 6 * MIB, "{v}");
        let rate = disk["wr_bytes_per_s"].as_f64().unwrap();
        assert!((rate * dt - (2 * MIB) as f64).abs() < 1.0, "{v}");

        drop(stdin);
        assert!(io.wait().unwrap().success());
        let v = once(&mut qmp, Duration::from_millis(200)).unwrap();
        assert_eq!(v["exports"][0]["clients"], 0, "{v}");
        assert_eq!(v["jobs"], json!([]), "{v}");
        drop(qmp);

        // QEMU's own shell, a new connection to the same port: the trace
        // commands.
        let mut shell = Command::new("qmp-shell")
            .arg(&sock)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qmp-shell runs (.ci/install-deps installs qemu.qmp)");
        shell
            .stdin
            .take()
            .unwrap()
            .write_all(
                b"trace-event-set-state name=nbd_receive_* enable=true\n\
                  trace-event-get-state name=nbd_receive_request\n\
                  trace-event-set-state name=no_such_event enable=true\n",
            )
            .unwrap();
        let out = shell.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let got: Value = text
            .lines()
            .filter_map(|l| l.strip_prefix("(QEMU) "))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["return"].is_array())
            .unwrap_or_else(|| panic!("{text}"));
        assert_eq!(
            got["return"],
            json!([{"name": "nbd_receive_request", "state": "enabled", "vcpu": false}]),
            "{text}"
        );
        assert!(
            text.contains(r#"unknown event \"no_such_event\""#),
            "{text}"
        );
        // A connection of its own, with its own greeting, for `quit`.
        connect(&sock).unwrap().cmd("quit", Value::Null).unwrap();
        assert!(
            a.wait_exit(Duration::from_secs(60))
                .is_some_and(|s| s.success())
        );
        let disk = dir.path().join("disk.img");
        let check = harness::host::qemu_io(
            &disk,
            &["read -P 0x5a 0 4M".into(), "read -P 0x5b 4M 2M".into()],
        );
        assert!(!check.contains("failed"), "{check}");
    }
}
