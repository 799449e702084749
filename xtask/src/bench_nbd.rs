//! `cargo xtask bench nbd`: the appliance's NBD server next to the host's
//! own servers, on the same image file, with the same clients, in one run.
//!
//! Servers: `qemu-nbd` and `qemu-storage-daemon` serving the raw image
//! natively on 127.0.0.1, and blockhaus (TCG) exporting the same file as a
//! virtio-blk disk through virtio-net, once on QEMU's user network
//! (`blockhaus`: slirp `hostfwd`, no TCP window scaling) and once on a tap
//! device in a network namespace (`bh-tap`: QEMU's userspace virtio-net
//! backend, no vhost-net here; needs root, skipped otherwise), with the
//! clients run inside that namespace. The host servers skip the VM boundary
//! and the guest's TCP stack, so the ratios measure blockhaus *plus* QEMU's
//! network path against a native server: read them as "what a client sees".
//!
//! Clients: `nbdcopy` sequential read (export → `null:`) and write (a
//! random file → export), and `fio --ioengine=nbd` 4 KiB random read and
//! write at QD 32 and random read at QD 1. Figures are printed, never
//! asserted: the machine is shared and noisy.

use harness::qemu::NetnsTap;
use harness::{Appliance, QemuConfig};
use serde_json::Value;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Options of `cargo xtask bench nbd`.
#[derive(clap::Args)]
pub struct NbdArgs {
    /// Size of the raw image, MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Seconds per fio run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Only these servers (comma-separated: qemu-nbd, qsd, blockhaus, bh-tap).
    #[arg(long)]
    only: Option<String>,
}

const MIB: u64 = 1 << 20;

/// A server under test, stopped on drop.
pub(crate) enum Running {
    Host(Child),
    Appliance(Box<Appliance>),
}

/// Where clients reach a server: a URI, run inside a namespace or not.
pub(crate) struct Target {
    pub(crate) uri: String,
    netns: Option<NetnsTap>,
}

impl Target {
    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(t) => t.exec(program),
            None => Command::new(program),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        match self {
            Running::Host(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Running::Appliance(a) => {
                let _ = a.qmp().execute("quit", Value::Null);
                a.wait_exit(Duration::from_secs(60));
            }
        }
    }
}

pub(crate) fn wait_port(port: u16, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("nothing listens on 127.0.0.1:{port}"))
}

pub(crate) fn spawn(cmd: &mut Command) -> Result<Child, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))
}

const APPEND: &str = "loglevel=warn --blockdev driver=virtio-blk,node-name=vblk,serial=disk0 \
    --nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809,max-connections=16 \
    --export type=nbd,id=e0,node-name=vblk,name=disk,writable=on";

pub(crate) fn start(server: &str, img: &Path, port: u16) -> Result<(Running, Target), String> {
    let local = Target {
        uri: format!("nbd://127.0.0.1:{port}/disk"),
        netns: None,
    };
    let running = match server {
        "qemu-nbd" => {
            let child = spawn(
                Command::new("qemu-nbd")
                    .args(["-f", "raw", "-x", "disk", "-b", "127.0.0.1"])
                    .args(["-p", &port.to_string(), "-t", "-e", "16"])
                    .args(["--cache=writeback", "--discard=unmap"])
                    .arg(img),
            )?;
            wait_port(port, Duration::from_secs(10))?;
            Running::Host(child)
        }
        "qsd" => {
            let child = spawn(
                Command::new("qemu-storage-daemon")
                    .arg("--blockdev")
                    .arg(format!(
                        "driver=file,filename={},node-name=f0,discard=unmap",
                        img.display()
                    ))
                    .args(["--blockdev", "driver=raw,node-name=r0,file=f0"])
                    .arg("--nbd-server")
                    .arg(format!(
                        "addr.type=inet,addr.host=127.0.0.1,addr.port={port},max-connections=16"
                    ))
                    .args([
                        "--export",
                        "type=nbd,id=e0,node-name=r0,name=disk,writable=on",
                    ]),
            )?;
            wait_port(port, Duration::from_secs(10))?;
            Running::Host(child)
        }
        "blockhaus" => {
            let image = harness::image::build(true)?;
            let cfg = QemuConfig {
                disks: vec![img.to_path_buf()],
                nbd_port: Some(port),
                append: APPEND.into(),
                ..QemuConfig::default()
            };
            let mut a = Appliance::start(&image, &cfg)?;
            a.qmp().negotiate()?;
            Running::Appliance(Box::new(a))
        }
        "bh-tap" => {
            let image = harness::image::build(true)?;
            let tap = NetnsTap::create()?;
            let cfg = QemuConfig {
                disks: vec![img.to_path_buf()],
                netns_tap: Some(tap.clone()),
                append: format!("{} {APPEND}", NetnsTap::GUEST_IP_SETTING),
                ..QemuConfig::default()
            };
            let mut a = Appliance::start(&image, &cfg)?;
            a.qmp().negotiate()?;
            let target = Target {
                uri: format!("nbd://{}/disk", NetnsTap::GUEST_IP),
                netns: Some(tap),
            };
            return Ok((Running::Appliance(Box::new(a)), target));
        }
        other => return Err(format!("unknown server '{other}'")),
    };
    Ok((running, local))
}

fn run_timed(cmd: &mut Command) -> Result<Duration, String> {
    let t0 = Instant::now();
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(t0.elapsed())
}

/// fio 4 KiB random I/O for `seconds`: IOPS.
fn fio(t: &Target, rw: &str, depth: u32, seconds: u64) -> Result<f64, String> {
    let out = t
        .command("fio")
        .args(["--name=bench", "--ioengine=nbd", "--bs=4k", "--direct=1"])
        .arg(format!("--uri={}", t.uri))
        .arg(format!("--rw={rw}"))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--runtime={seconds}"))
        .args(["--time_based", "--ramp_time=1", "--output-format=json"])
        .output()
        .map_err(|e| format!("fio: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "fio {rw} QD{depth} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // fio may print notes before the JSON.
    let json = text.find('{').map(|i| &text[i..]).unwrap_or(&text);
    let v: Value = serde_json::from_str(json).map_err(|e| format!("fio JSON: {e}"))?;
    let side = if rw.contains("read") { "read" } else { "write" };
    v["jobs"][0][side]["iops"]
        .as_f64()
        .ok_or_else(|| format!("no IOPS in fio output: {json}"))
}

/// Measurements of one server: read MB/s, write MB/s, randread QD32,
/// randwrite QD32, randread QD1 IOPS.
type Row = [f64; 5];

const COLUMNS: [&str; 5] = [
    "nbdcopy read MB/s",
    "nbdcopy write MB/s",
    "randread QD32 IOPS",
    "randwrite QD32 IOPS",
    "randread QD1 IOPS",
];

fn measure(t: &Target, src: &Path, size: u64, seconds: u64) -> Result<Row, String> {
    let mb = size as f64 / 1e6;
    let read = run_timed(t.command("nbdcopy").arg(&t.uri).arg("null:"))?;
    let write = run_timed(t.command("nbdcopy").arg("--flush").arg(src).arg(&t.uri))?;
    Ok([
        mb / read.as_secs_f64(),
        mb / write.as_secs_f64(),
        fio(t, "randread", 32, seconds)?,
        fio(t, "randwrite", 32, seconds)?,
        fio(t, "randread", 1, seconds)?,
    ])
}

fn scratch() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("blockhaus-bench-nbd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    Ok(dir)
}

fn make_images(dir: &Path, size: u64) -> Result<(PathBuf, PathBuf), String> {
    let img = dir.join("disk.img");
    let src = dir.join("random.img");
    for p in [&img, &src] {
        run_timed(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "raw"])
                .arg(p)
                .arg(size.to_string()),
        )?;
    }
    // Random (incompressible, fully allocated) data to write, and a fully
    // allocated image to read.
    for p in [&src, &img] {
        run_timed(
            Command::new("dd")
                .args(["if=/dev/urandom", "bs=1M", "status=none", "conv=notrunc"])
                .arg(format!("of={}", p.display()))
                .arg(format!("count={}", size / MIB)),
        )?;
    }
    Ok((img, src))
}

pub fn bench(args: NbdArgs) -> Result<(), String> {
    let size = args.size_mib.max(16) * MIB;
    let seconds = args.seconds.max(1);
    let servers: Vec<String> = match &args.only {
        Some(list) => list.split(',').map(String::from).collect(),
        None => ["qemu-nbd", "qsd", "blockhaus", "bh-tap"]
            .map(String::from)
            .to_vec(),
    };
    let dir = scratch()?;
    let result = (|| {
        let (img, src) = make_images(&dir, size)?;
        println!(
            "NBD benchmark: {} MiB raw image, fio {seconds} s per run, 127.0.0.1",
            size / MIB
        );
        println!("blockhaus: TCG, virtio-blk disk; virtio-net on QEMU user networking (slirp");
        println!("  hostfwd); bh-tap: virtio-net on a tap in a network namespace (no vhost-net)");
        let mut rows: Vec<(String, Row)> = Vec::new();
        for s in &servers {
            let port = harness::qemu::free_port();
            let (running, target) = match start(s, &img, port) {
                Ok(r) => r,
                Err(e) if s == "bh-tap" => {
                    println!("  {s}: skipped ({e})");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let row = measure(&target, &src, size, seconds);
            drop(running);
            drop(target);
            let row = row.map_err(|e| format!("{s}: {e}"))?;
            println!("  {s}: done");
            rows.push((s.clone(), row));
        }
        print_table(&rows);
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn print_table(rows: &[(String, Row)]) {
    let base = rows.iter().find(|(s, _)| s == "qemu-nbd").map(|(_, r)| *r);
    print!("{:<10}", "server");
    for c in COLUMNS {
        print!(" {c:>21}");
    }
    println!();
    for (name, row) in rows {
        print!("{name:<10}");
        for (i, v) in row.iter().enumerate() {
            let cell = match base {
                Some(b) if b[i] > 0.0 => format!("{v:.0} ({:.2}x)", v / b[i]),
                _ => format!("{v:.0}"),
            };
            print!(" {cell:>21}");
        }
        println!();
    }
    if base.is_some() {
        println!("(ratios to qemu-nbd, measured in this run)");
    }
}
