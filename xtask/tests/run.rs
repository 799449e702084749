//! `cargo xtask run` as a user meets it: it boots, prints how to connect,
//! every QMP client that connects gets the greeting and can talk, and
//! Ctrl-C stops the appliance through its halt path with exit 0.

use serde_json::{Value, json};
use std::ffi::OsStr;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Kills xtask and its QEMU (in its own process group; its command line
/// names the state directory) when a test ends early.
struct Kill(u32, String);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &self.1])
            .status();
    }
}

/// `cargo xtask run` with its state in `state`, NBD on `port`, and `extra`
/// arguments.
fn spawn_run(state: &Path, port: u16, extra: &[&OsStr]) -> (Child, Kill) {
    let child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["run", "--nbd-port", &port.to_string(), "--state-dir"])
        .arg(state)
        .args(extra)
        .current_dir(harness::workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let kill = Kill(child.id(), state.display().to_string());
    (child, kill)
}

/// Waits up to a minute for xtask to exit after `what`; its status,
/// stdout and stderr.
fn wait_exit(child: &mut Child, what: &str) -> (ExitStatus, String, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "xtask run did not stop after {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut out).unwrap();
    }
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).unwrap();
    }
    (status, out, err)
}

/// Ctrl-C to xtask: expects it to exit 0; its stdout and stderr.
fn ctrl_c(child: &mut Child) -> (String, String) {
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let (status, out, err) = wait_exit(child, "Ctrl-C");
    assert!(
        status.success(),
        "xtask run exit {status}\nstdout:\n{out}\nstderr:\n{err}"
    );
    (out, err)
}

#[test]
fn run_boots_serves_qmp_to_successive_clients_and_stops_on_ctrl_c() {
    let state = tempfile::tempdir().unwrap();
    let port = harness::qemu::free_port();
    let (mut child, _guard) = spawn_run(state.path(), port, &[]);
    let sock = state.path().join("qmp.sock");

    // First client: greeting, negotiation, a command.
    let mut qmp =
        harness::Qmp::connect(&sock, Duration::from_secs(120)).expect("xtask run offers qmp.sock");
    let greeting = qmp.read_greeting().unwrap();
    assert_eq!(greeting["QMP"]["capabilities"], json!(["oob"]));
    qmp.negotiate().unwrap();
    let v = qmp.cmd("query-version", Value::Null).unwrap();
    assert_eq!(
        v["package"],
        json!(format!("blockhaus {}", env!("CARGO_PKG_VERSION")))
    );
    drop(qmp);

    // A second client gets the greeting too, and must negotiate first.
    let mut qmp = harness::Qmp::connect(&sock, Duration::from_secs(10)).unwrap();
    qmp.read_greeting().unwrap();
    let r = qmp.execute("query-status", Value::Null).unwrap();
    assert_eq!(r["error"]["class"], "CommandNotFound", "{r}");
    qmp.negotiate().unwrap();
    assert_eq!(
        qmp.cmd("query-status", Value::Null).unwrap()["status"],
        "running"
    );
    drop(qmp);

    // The default disk is exported over NBD.
    let info = Command::new("qemu-img")
        .args([
            "info",
            "--output=json",
            &format!("nbd://127.0.0.1:{port}/disk0"),
        ])
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap_or(Value::Null);
    assert_eq!(
        info["virtual-size"],
        json!(1u64 << 30),
        "qemu-img info over NBD: {info}"
    );

    // Ctrl-C: xtask sends quit; the appliance halts cleanly.
    let (out, err) = ctrl_c(&mut child);
    assert!(
        err.contains("UNIX-CONNECT:"),
        "run must say how to connect:\n{err}"
    );
    assert!(
        out.contains("=== blockhaus halt report ==="),
        "console:\n{out}"
    );
    assert!(out.contains("reason: host-qmp-quit"), "console:\n{out}");
    assert!(err.contains("QEMU exited (exit status: 0)"), "{err}");
    assert!(
        state.path().join("disk0.img").exists(),
        "the default disk is made with qemu-img"
    );
}

fn qemu_img_create_qcow2(path: &std::path::Path, size: &str) {
    let o = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
}

/// `--disk x.qcow2` (issue 11): the image is opened as qcow2 and exported;
/// one made by `qemu-img create` has no room in its file, which cannot grow
/// in the appliance: xtask says so and how to give it room, the node shows
/// the room left, and a write that needs a cluster fails cleanly. The same
/// image given room with `truncate -s` takes the data.
#[test]
fn run_opens_qcow2_disks_and_says_how_to_give_them_room() {
    let state = tempfile::tempdir().unwrap();
    let tiny = state.path().join("tiny.qcow2");
    let roomy = state.path().join("roomy.qcow2");
    qemu_img_create_qcow2(&tiny, "16M");
    qemu_img_create_qcow2(&roomy, "16M");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&roomy)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let port = harness::qemu::free_port();
    let disks = [
        "--disk".as_ref(),
        tiny.as_os_str(),
        "--disk".as_ref(),
        roomy.as_os_str(),
    ];
    let (mut child, _guard) = spawn_run(state.path(), port, &disks);
    let sock = state.path().join("qmp.sock");
    let mut qmp =
        harness::Qmp::connect(&sock, Duration::from_secs(120)).expect("xtask run offers qmp.sock");
    qmp.read_greeting().unwrap();
    qmp.negotiate().unwrap();
    let nodes = qmp.cmd("query-named-block-nodes", Value::Null).unwrap();
    let room = |name: &str| -> u64 {
        let n = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == name)
            .unwrap_or_else(|| panic!("no node {name}: {nodes}"));
        assert_eq!(n["drv"], "qcow2", "{n}");
        n["image"]["format-specific"]["data"]["x-room-left"]
            .as_u64()
            .unwrap_or_else(|| panic!("{n}"))
    };
    assert!(room("disk0") < 0x10000, "{nodes}");
    assert!(room("disk1") > 31 << 20, "{nodes}");

    // Over NBD: the tiny image refuses a new cluster, the roomy one takes it.
    let qemu_io = |name: &str, cmd: &str| {
        let o = Command::new("qemu-io")
            .args(["-f", "raw", "-c", cmd])
            .arg(format!("nbd://127.0.0.1:{port}/{name}"))
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let out = qemu_io("disk0", "write -P 0x11 0 64k");
    assert!(out.contains("No space left on device"), "{out}");
    let out = qemu_io("disk1", "write -P 0x22 0 1M");
    assert!(out.contains("wrote 1048576/1048576"), "{out}");

    let r = qmp.execute("quit", Value::Null).unwrap();
    assert_eq!(r, json!({"return": {}}));
    let (status, _, err) = wait_exit(&mut child, "quit");
    assert!(status.success(), "xtask run exit {status}\nstderr:\n{err}");
    let tiny_note = format!("{} is a qcow2 image of 16 MiB in a file of", tiny.display());
    assert!(err.contains(&tiny_note), "{err}");
    assert!(
        err.contains(&format!("truncate -s 18M {}", tiny.display())),
        "{err}"
    );
    assert!(
        !err.contains(&format!("{} is a qcow2", roomy.display())),
        "{err}"
    );

    for img in [&tiny, &roomy] {
        let o = Command::new("qemu-img")
            .arg("check")
            .arg(img)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "qemu-img check {}: {}",
            img.display(),
            String::from_utf8_lossy(&o.stdout)
        );
    }
    let o = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x22 0 1M"])
        .arg(&roomy)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && !out.contains("fail"), "{out}");
}

/// `cargo xtask image --config` then `cargo xtask run --image` (issue 14):
/// OVMF boots the disk image, the configuration file exports the data disk,
/// the proxy hands clients the greeting without the firmware's COM2
/// output, and Ctrl-C halts cleanly.
#[test]
fn run_image_boots_the_disk_image_under_ovmf() {
    let state = tempfile::tempdir().unwrap();
    let conf = state.path().join("blockhaus.conf");
    std::fs::write(
        &conf,
        "--nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809\n\
         --blockdev driver=virtio-blk,node-name=data,serial=disk0\n\
         --export type=nbd,id=data,node-name=data,name=data\n",
    )
    .unwrap();
    let img = state.path().join("blockhaus.img");
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["image", "--config"])
        .arg(&conf)
        .arg("-o")
        .arg(&img)
        .current_dir(harness::workspace_root())
        .output()
        .unwrap();
    assert!(o.status.success(), "xtask image: {o:?}");
    let data = state.path().join("data.raw");
    let o = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&data)
        .arg("8M")
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let port = harness::qemu::free_port();
    let (mut child, _guard) = spawn_run(
        state.path(),
        port,
        &[
            "--image".as_ref(),
            img.as_os_str(),
            "--disk".as_ref(),
            data.as_os_str(),
        ],
    );
    let sock = state.path().join("qmp.sock");
    let mut qmp =
        harness::Qmp::connect(&sock, Duration::from_secs(120)).expect("xtask run offers qmp.sock");
    // Plain read: the first line a client gets is the greeting.
    qmp.read_greeting().unwrap();
    qmp.negotiate().unwrap();
    let devs = qmp.cmd("x-query-devices", Value::Null).unwrap();
    assert!(
        devs.as_array()
            .unwrap()
            .iter()
            .any(|d| d["serial"] == "boot" && d["boot-disk"] == json!(true)),
        "{devs}"
    );
    drop(qmp);
    let info = Command::new("nbdinfo")
        .args(["--size", &format!("nbd://127.0.0.1:{port}/data")])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&info.stdout).trim(),
        "8388608",
        "{info:?}"
    );
    let (out, err) = ctrl_c(&mut child);
    assert!(out.contains("reason: host-qmp-quit"), "console:\n{out}");
    assert!(err.contains("OVMF, image"), "{err}");
}
