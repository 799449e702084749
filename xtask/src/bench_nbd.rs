//! `cargo xtask bench nbd`: the appliance's NBD server next to the host's
//! own servers, on the same image file, with the same clients, in one run.
//!
//! Servers: `qemu-nbd` and `qemu-storage-daemon` serving the raw image
//! natively on 127.0.0.1; blockhaus (TCG) exporting the same file as a
//! virtio-blk disk (`cache=none`) through virtio-net, once on QEMU's user
//! network (`blockhaus`: slirp `hostfwd`, no TCP window scaling) and once
//! on a tap device in a network namespace (`bh-tap`: QEMU's userspace
//! virtio-net backend, no vhost-net here; needs root, skipped otherwise),
//! with the clients run inside that namespace; and the anchor, the Linux VM
//! blockhaus replaces ([`crate::linux_anchor`]: Debian's kernel and
//! qemu-nbd, same machine, disk, NIC and network), as `linux` (slirp) and
//! `linux-tap`. Each appliance row is given as a ratio to the Linux VM on
//! the same network; the host servers skip the VM boundary and are there
//! as the ceiling.
//!
//! With TLS (`nbds://`, the same P-256 certificates for both, no client
//! certificate): `qemu-nbd-tls` on the host and `bh-tls`, the appliance
//! on the tap with `-cpu max` for RDRAND; `bh-tls` is given as a ratio to
//! `bh-tap`, what TLS costs.
//!
//! A memory sweep follows (`--no-sweep` skips it): the least `-m` at which
//! each VM serves a full 4-connection `nbdcopy` read, and blockhaus's heap
//! once ready.
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
    /// Only these servers (comma-separated: qemu-nbd, qsd, blockhaus,
    /// bh-tap, linux, linux-tap, qemu-nbd-tls, bh-tls).
    #[arg(long)]
    only: Option<String>,
    /// Skip the memory sweep.
    #[arg(long)]
    no_sweep: bool,
}

const MIB: u64 = 1 << 20;

/// A server under test, stopped on drop.
pub(crate) enum Running {
    Host(Child),
    Appliance(Box<Appliance>),
    /// Stopped by its own drop.
    Linux {
        _vm: crate::linux_anchor::LinuxVm,
    },
}

/// Where clients reach a server: a URI, run inside a namespace or not.
pub(crate) struct Target {
    pub(crate) uri: String,
    netns: Option<NetnsTap>,
    /// `HOME` for the clients: libnbd finds the CA of an `nbds://` server
    /// in `$HOME/.pki/libnbd` (fio's nbd engine refuses the URI's
    /// `tls-certificates=`, a local file).
    home: Option<PathBuf>,
}

impl Target {
    fn command(&self, program: &str) -> Command {
        let mut cmd = match &self.netns {
            Some(t) => t.exec(program),
            None => Command::new(program),
        };
        if let Some(home) = &self.home {
            cmd.env("HOME", home);
        }
        cmd
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
            Running::Linux { .. } => {}
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

const APPEND: &str = "--blockdev driver=virtio-blk,node-name=vblk,serial=disk0 \
    --nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809,max-connections=16 \
    --export type=nbd,id=e0,node-name=vblk,name=disk,writable=on";

/// The appliance on `img` with `cache=none` (the harness's disks use the
/// host page cache), as the Linux VM has it.
fn appliance_config(img: &Path, memory: &str, loglevel: &str) -> QemuConfig {
    QemuConfig {
        memory: memory.into(),
        append: format!("loglevel={loglevel} {APPEND}"),
        extra: [
            "-drive".to_string(),
            format!(
                "file={},if=none,id=disk0,format=raw,cache=none,discard=unmap",
                img.display()
            ),
            "-device".into(),
            "virtio-blk-pci,drive=disk0,serial=disk0".into(),
        ]
        .map(Into::into)
        .to_vec(),
        ..QemuConfig::default()
    }
}

/// Polls `nbdinfo URI` until it answers: the time a client waits.
fn wait_nbdinfo(t: &Target, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let ok = t
            .command("nbdinfo")
            .arg(&t.uri)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("nbdinfo {}: no answer", t.uri));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The host's qemu-nbd serving `img` as `disk` on 127.0.0.1:`port`.
fn qemu_nbd(img: &Path, port: u16) -> Command {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "raw", "-x", "disk", "-b", "127.0.0.1"])
        .args(["-p", &port.to_string(), "-t", "-e", "16"])
        .args(["--cache=writeback", "--discard=unmap"])
        .arg(img);
    cmd
}

pub(crate) fn start(server: &str, img: &Path, port: u16) -> Result<(Running, Target), String> {
    let local = Target {
        uri: format!("nbd://127.0.0.1:{port}/disk"),
        netns: None,
        home: None,
    };
    let running = match server {
        "qemu-nbd" => {
            let child = spawn(&mut qemu_nbd(img, port))?;
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
                nbd_port: Some(port),
                ..appliance_config(img, "256M", "warn")
            };
            let mut a = Appliance::start(&image, &cfg)?;
            a.qmp().negotiate()?;
            Running::Appliance(Box::new(a))
        }
        "bh-tap" => return on_tap(img, "", "", &[], "nbd", None),
        "linux" | "linux-tap" => {
            let arts = crate::linux_anchor::build()?;
            let (net, target) = if server == "linux" {
                let t = Target {
                    uri: format!("nbd://127.0.0.1:{port}/"),
                    netns: None,
                    home: None,
                };
                (crate::linux_anchor::Net::Slirp(port), t)
            } else {
                let tap = NetnsTap::create()?;
                let t = Target {
                    uri: format!("nbd://{}/", NetnsTap::GUEST_IP),
                    netns: Some(tap.clone()),
                    home: None,
                };
                (crate::linux_anchor::Net::Tap(tap), t)
            };
            let vm = crate::linux_anchor::LinuxVm::start(&arts, img, &net, "256M")?;
            return Ok((Running::Linux { _vm: vm }, target));
        }
        other => return Err(format!("unknown server '{other}'")),
    };
    Ok((running, local))
}

/// The TLS servers: `qemu-nbd-tls` (the host's qemu-nbd with
/// `--tls-creds`) and `bh-tls` (the appliance on the tap, credentials by
/// `--object` on its command line), with the certificates in `pki`.
fn start_tls(
    server: &str,
    img: &Path,
    port: u16,
    pki: &harness::pki::Pki,
) -> Result<(Running, Target), String> {
    let home = pki.dir.path().join("home");
    let ca = home.join(".pki/libnbd");
    std::fs::create_dir_all(&ca).map_err(|e| e.to_string())?;
    std::fs::write(ca.join("ca-cert.pem"), pki.read("ca-cert.pem")).map_err(|e| e.to_string())?;
    match server {
        "qemu-nbd-tls" => {
            let child = spawn(
                qemu_nbd(img, port)
                    .arg("--object")
                    .arg(format!(
                        "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir={}",
                        pki.path("server")
                    ))
                    .args(["--tls-creds", "tls0"]),
            )?;
            wait_port(port, Duration::from_secs(10))?;
            let target = Target {
                uri: format!("nbds://127.0.0.1:{port}/disk"),
                netns: None,
                home: Some(home),
            };
            Ok((Running::Host(child), target))
        }
        "bh-tls" => {
            let pem = |f: &str| String::from_utf8_lossy(&pki.read(f)).into_owned();
            let object = serde_json::json!({
                "qom-type": "tls-creds-x509", "id": "tls0", "endpoint": "server",
                "verify-peer": false,
                "x-server-cert": pem("server-cert.pem"),
                "x-server-key": pem("server-key.pem"),
            });
            on_tap(
                img,
                &format!("--object {object}"),
                ",tls-creds=tls0",
                &["-cpu", "max"],
                "nbds",
                Some(home),
            )
        }
        other => start(other, img, port),
    }
}

/// The appliance on a tap in a network namespace: `options` before the
/// boot options, `server` added to `--nbd-server`'s, `qemu` extra QEMU
/// arguments; clients inside the namespace use `scheme://GUEST_IP/disk`
/// with `home` as `HOME`.
fn on_tap(
    img: &Path,
    options: &str,
    server: &str,
    qemu: &[&str],
    scheme: &str,
    home: Option<PathBuf>,
) -> Result<(Running, Target), String> {
    let image = harness::image::build(true)?;
    let tap = NetnsTap::create()?;
    let base = appliance_config(img, "256M", "warn");
    let append = base
        .append
        .replace("max-connections=16", &format!("max-connections=16{server}"));
    let mut extra = base.extra.clone();
    extra.extend(qemu.iter().map(Into::into));
    let cfg = QemuConfig {
        netns_tap: Some(tap.clone()),
        append: format!("{} {options} {append}", NetnsTap::GUEST_IP_SETTING),
        extra,
        ..base
    };
    let mut a = Appliance::start(&image, &cfg)?;
    a.qmp().negotiate()?;
    let target = Target {
        uri: format!("{scheme}://{}/disk", NetnsTap::GUEST_IP),
        netns: Some(tap),
        home,
    };
    Ok((Running::Appliance(Box::new(a)), target))
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

/// Measurements of one server: QEMU start to the first `nbdinfo`
/// answered (s), read MB/s, write MB/s, randread QD32, randwrite QD32,
/// randread QD1 IOPS, then the 4K read latencies of [`WAKE_PROBE`] (ms).
type Row = [f64; 9];

const COLUMNS: [&str; 9] = [
    "NBD ready s",
    "nbdcopy read MB/s",
    "nbdcopy write MB/s",
    "randread QD32 IOPS",
    "randwrite QD32 IOPS",
    "randread QD1 IOPS",
    "4K read busy ms",
    "4K read idle 1s ms",
    "idle 1s host-awake ms",
];

/// Columns where less is better (times): their ratio is "how many times
/// sooner" (the anchor's value over this one).
const LOWER_IS_BETTER: [bool; 9] = [true, false, false, false, false, false, true, true, true];

/// One connection, 4 KiB reads one at a time: the median latency of 30
/// back to back, then of 10 that each follow a second of silence (the
/// appliance idles in `hlt` then; the first request wakes it), then of 10
/// more that each follow a second of silence while a `SCHED_IDLE` spinner
/// runs on every host CPU. The spinners take no time from QEMU or the
/// client (any other task preempts them at once) but keep the host's CPUs
/// out of their own idle state: on a host that is itself a VM, waking a
/// halted host CPU costs milliseconds, paid by every guest alike, and the
/// third figure leaves that out. Printed as "busy idle awake" in
/// milliseconds.
const WAKE_PROBE: &str = r#"
import nbd, os, signal, sys, time, statistics
h = nbd.NBD()
h.connect_uri(sys.argv[1])
def read(i):
    t = time.perf_counter()
    h.pread(4096, (i * 1048576) % h.get_size())
    return (time.perf_counter() - t) * 1000
for i in range(20):
    read(i)
busy = statistics.median(read(i) for i in range(30))
idle = []
for i in range(10):
    time.sleep(1.0)
    idle.append(read(i))
spinners = []
for cpu in range(os.cpu_count()):
    pid = os.fork()
    if pid == 0:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        while True:
            pass
    spinners.append(pid)
try:
    awake = []
    for i in range(10):
        time.sleep(1.0)
        awake.append(read(i))
finally:
    for pid in spinners:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
print("%.3f %.3f %.3f" % (busy, statistics.median(idle), statistics.median(awake)))
h.shutdown()
"#;

fn wake_latency(t: &Target) -> Result<[f64; 3], String> {
    let out = t
        .command("/usr/bin/python3")
        .args(["-c", WAKE_PROBE, &t.uri])
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    match (out.status.success(), v.as_slice()) {
        (true, &[busy, idle, awake]) => Ok([busy, idle, awake]),
        _ => Err(format!(
            "wake probe: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

fn measure(
    t: &Target,
    ready: Duration,
    src: &Path,
    size: u64,
    seconds: u64,
) -> Result<Row, String> {
    let mb = size as f64 / 1e6;
    let read = run_timed(t.command("nbdcopy").arg(&t.uri).arg("null:"))?;
    let write = run_timed(t.command("nbdcopy").arg("--flush").arg(src).arg(&t.uri))?;
    let [busy, idle, awake] = wake_latency(t)?;
    Ok([
        ready.as_secs_f64(),
        mb / read.as_secs_f64(),
        mb / write.as_secs_f64(),
        fio(t, "randread", 32, seconds)?,
        fio(t, "randwrite", 32, seconds)?,
        fio(t, "randread", 1, seconds)?,
        busy,
        idle,
        awake,
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

/// Servers that need root (a tap in a network namespace): skipped, with
/// the reason, where it cannot be made.
fn needs_tap(server: &str) -> bool {
    server.ends_with("tap") || server == "bh-tls"
}

pub fn bench(args: NbdArgs) -> Result<(), String> {
    let size = args.size_mib.max(16) * MIB;
    let seconds = args.seconds.max(1);
    let servers: Vec<String> = match &args.only {
        Some(list) => list.split(',').map(String::from).collect(),
        None => [
            "qemu-nbd",
            "qsd",
            "linux",
            "blockhaus",
            "linux-tap",
            "bh-tap",
            "qemu-nbd-tls",
            "bh-tls",
        ]
        .map(String::from)
        .to_vec(),
    };
    // Build before anything is timed.
    if servers
        .iter()
        .any(|s| matches!(s.as_str(), "blockhaus" | "bh-tap" | "bh-tls"))
    {
        harness::image::build(true)?;
    }
    if servers.iter().any(|s| s.starts_with("linux")) {
        crate::linux_anchor::build()?;
    }
    let pki = servers
        .iter()
        .any(|s| s.ends_with("-tls"))
        .then(harness::pki::Pki::new);
    let dir = scratch()?;
    let result = (|| {
        let (img, src) = make_images(&dir, size)?;
        println!(
            "NBD benchmark: {} MiB raw image (cache=none in the VMs), fio {seconds} s per run",
            size / MIB
        );
        println!(
            "VMs: q35, TCG, -m 256M, virtio-blk + virtio-net-pci; slirp hostfwd to 127.0.0.1,"
        );
        println!("  or (-tap rows) a tap in a network namespace (no vhost-net), clients inside it");
        let mut rows: Vec<(String, Row)> = Vec::new();
        for s in &servers {
            let port = harness::qemu::free_port();
            let t0 = Instant::now();
            let started = match &pki {
                Some(pki) => start_tls(s, &img, port, pki),
                None => start(s, &img, port),
            };
            let (running, target) = match started {
                Ok(r) => r,
                Err(e) if needs_tap(s) => {
                    println!("  {s}: skipped ({e})");
                    continue;
                }
                Err(e) => return Err(format!("{s}: {e}")),
            };
            let row = wait_nbdinfo(&target, Duration::from_secs(180))
                .and_then(|()| measure(&target, t0.elapsed(), &src, size, seconds));
            drop(running);
            drop(target);
            let row = row.map_err(|e| format!("{s}: {e}"))?;
            println!("  {s}: done");
            rows.push((s.clone(), row));
        }
        print_table(&rows);
        if !args.no_sweep {
            memory_sweep(&img)?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The row each server is compared with: the Linux VM on the same network
/// (the host servers have none).
fn anchor_of(server: &str) -> Option<&'static str> {
    match server {
        "blockhaus" => Some("linux"),
        "bh-tap" => Some("linux-tap"),
        // What TLS costs.
        "bh-tls" => Some("bh-tap"),
        _ => None,
    }
}

fn print_table(rows: &[(String, Row)]) {
    print!("{:<10}", "server");
    for c in COLUMNS {
        print!(" {c:>21}");
    }
    println!();
    for (name, row) in rows {
        let base = anchor_of(name)
            .and_then(|a| rows.iter().find(|(s, _)| s == a))
            .map(|(_, r)| *r);
        print!("{name:<10}");
        for (i, v) in row.iter().enumerate() {
            let digits = match i {
                0 | 6..=8 => 2,
                _ => 0,
            };
            let cell = match base {
                // Time: how many times sooner.
                Some(b) if LOWER_IS_BETTER[i] && *v > 0.0 => {
                    format!("{v:.digits$} ({:.1}x)", b[i] / v)
                }
                Some(b) if b[i] > 0.0 => format!("{v:.digits$} ({:.2}x)", v / b[i]),
                _ => format!("{v:.digits$}"),
            };
            print!(" {cell:>21}");
        }
        println!();
    }
    println!(
        "(ratios: blockhaus to linux, bh-tap to linux-tap, bh-tls to bh-tap, measured in this run;"
    );
    println!(" for NBD ready and the 4K read latencies, how many times sooner;");
    println!(" 'idle 1s': each read follows a second without requests;");
    println!(" 'host-awake': the same while a SCHED_IDLE spinner keeps every host CPU");
    println!(" out of its own idle state, which leaves out the host's wake-up)");
}

/// `-m` sizes tried, MiB, largest first.
const SWEEP_BLOCKHAUS: [u32; 8] = [64, 48, 40, 32, 28, 24, 20, 16];
const SWEEP_LINUX: [u32; 5] = [160, 128, 112, 96, 64];

/// Whether a VM booted with `memory_mib` serves a full 4-connection
/// nbdcopy read of `img` (over slirp): `Ok(Some(heap KiB at ready))` for
/// blockhaus, `Ok(None)` for Linux, `Err` with the failure.
fn serves_at(
    server: &str,
    image: &Path,
    img: &Path,
    memory_mib: u32,
) -> Result<Option<u64>, String> {
    let port = harness::qemu::free_port();
    let memory = format!("{memory_mib}M");
    let target = Target {
        uri: format!(
            "nbd://127.0.0.1:{port}/{}",
            if server == "linux" { "" } else { "disk" }
        ),
        netns: None,
        home: None,
    };
    let copy = |t: &Target| -> Result<(), String> {
        wait_nbdinfo(t, Duration::from_secs(120))?;
        run_timed(
            t.command("nbdcopy")
                .arg("--connections=4")
                .arg(&t.uri)
                .arg("null:"),
        )
        .map(|_| ())
    };
    if server == "linux" {
        let arts = crate::linux_anchor::build()?;
        let _vm = crate::linux_anchor::LinuxVm::start(
            &arts,
            img,
            &crate::linux_anchor::Net::Slirp(port),
            &memory,
        )?;
        return copy(&target).map(|()| None);
    }
    let cfg = QemuConfig {
        nbd_port: Some(port),
        ..appliance_config(img, &memory, "info")
    };
    let mut a = Appliance::start(image, &cfg)?;
    a.qmp().negotiate()?;
    let result = copy(&target);
    let console = a.console();
    let _ = a.qmp().execute("quit", Value::Null);
    a.wait_exit(Duration::from_secs(60));
    result?;
    if console.contains("panicked") {
        return Err("the appliance panicked".into());
    }
    let heap = console
        .lines()
        .find_map(|l| l.split("heap at ready: ").nth(1))
        .and_then(|l| l.split(" KiB").next())
        .and_then(|n| n.trim().parse().ok());
    Ok(heap)
}

/// The least `-m` at which each VM serves a full 4-connection read.
fn memory_sweep(img: &Path) -> Result<(), String> {
    println!("memory sweep: the least -m that serves a full 4-connection nbdcopy read (slirp)");
    let image = harness::image::build(true)?;
    for (server, sizes) in [
        ("linux", &SWEEP_LINUX[..]),
        ("blockhaus", &SWEEP_BLOCKHAUS[..]),
    ] {
        let mut least = None;
        for &m in sizes {
            match serves_at(server, &image, img, m) {
                Ok(heap) => {
                    let heap = heap
                        .map(|k| format!(", heap at ready {k} KiB"))
                        .unwrap_or_default();
                    println!("  {server} -m {m}M: served{heap}");
                    least = Some(m);
                }
                Err(e) => {
                    let first = e.lines().next().unwrap_or_default();
                    println!("  {server} -m {m}M: failed ({first})");
                    break;
                }
            }
        }
        match least {
            Some(m) => println!("  {server}: least -m {m}M"),
            None => println!("  {server}: failed at every size tried"),
        }
    }
    Ok(())
}
