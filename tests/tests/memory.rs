//! Memory follows the machine (issue 13, point 4): the appliance's budgets
//! (TCP buffers, listeners, clients, NBD read and write budgets) come from
//! the heap present, and a request the heap cannot hold is answered
//! `ENOMEM` instead of stopping the appliance. Booted small (`-m 32M`,
//! `-m 24M`) on a tap in a network namespace (needs root; skipped with a
//! note otherwise), it serves `nbdcopy` while a greedy raw client asks for
//! 64 reads of 32 MiB and never reads a reply; the copy matches the disk
//! image, the appliance keeps serving, nothing panics and `quit` is clean.
//! The heap the appliance holds once ready, as its console prints it,
//! stays within 4 MiB.
//!
//! Also the ERRATA's double fault: a panic inside the network poll (the
//! network's `RefCell` held) still runs the whole halt sequence.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use harness::host::{MIB, run};
use harness::qemu::{FAILURE_EXIT_STATUS, NetnsTap, free_port};
use harness::{Appliance, QemuConfig};
use serde_json::Value;

const DISK_SIZE: u64 = 64 * MIB;

/// A raw disk of random bytes.
fn random_disk(dir: &Path) -> PathBuf {
    let path = dir.join("disk0.raw");
    run(Command::new("dd")
        .arg("if=/dev/urandom")
        .arg(format!("of={}", path.display()))
        .args([
            "bs=1M",
            &format!("count={}", DISK_SIZE / MIB),
            "status=none",
        ]));
    path
}

fn export_append(extra: &str, server_extra: &str) -> String {
    format!(
        "{extra} --blockdev driver=virtio-blk,node-name=disk0,serial=disk0 \
         --nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809{server_extra} \
         --export type=nbd,id=e0,node-name=disk0,name=disk0,writable=on"
    )
}

/// The KiB the console says the heap holds once the appliance is ready.
fn heap_at_ready(console: &str) -> u64 {
    let line = console
        .lines()
        .find_map(|l| l.split("heap at ready: ").nth(1))
        .unwrap_or_else(|| panic!("no 'heap at ready' line:\n{console}"));
    line.split(" KiB used")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("bad heap line '{line}'"))
}

/// A client that asks for 64 reads of 32 MiB and reads no reply until
/// told (Python's sockets, inside the namespace). It prints `sent` once
/// every request is out; a line on its stdin makes it read the 64 replies
/// and print how many carried data and each error it saw. With a CA
/// file as its second argument it starts TLS first (`NBD_OPT_STARTTLS`).
const GREEDY: &str = r#"
import socket, ssl, struct, sys
s = socket.create_connection((sys.argv[1], 10809))
def recv(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise SystemExit("server closed")
        b += c
    return b
assert recv(18)[:16] == b"NBDMAGICIHAVEOPT"
s.sendall(struct.pack(">I", 3))
if len(sys.argv) > 2:
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 5, 0))
    assert struct.unpack(">QIII", recv(20))[2] == 1, "STARTTLS refused"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(sys.argv[2])
    s = ctx.wrap_socket(s, server_hostname=sys.argv[1])
name = b"disk0"
data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(data)) + data)
while True:
    _, _, kind, length = struct.unpack(">QIII", recv(20))
    recv(length)
    if kind == 1:
        break
    if kind & 0x80000000:
        raise SystemExit("NBD_OPT_GO refused: %#x" % kind)
for i in range(64):
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, (i % 2) * 32 << 20, 32 << 20))
print("sent", flush=True)
sys.stdin.readline()
seen = {}
for i in range(64):
    magic, error, cookie = struct.unpack(">IIQ", recv(16))
    assert magic == 0x67446698
    if error == 0:
        recv(32 << 20)
    seen[error] = seen.get(error, 0) + 1
print(" ".join("%d:%d" % kv for kv in sorted(seen.items())), flush=True)
"#;

fn start_greedy(tap: &NetnsTap, tls_ca: Option<&str>) -> Child {
    let mut child = tap
        .exec("/usr/bin/python3")
        .args(["-c", GREEDY, NetnsTap::GUEST_IP])
        .args(tls_ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "sent", "greedy client failed");
    child
}

/// Lets the greedy client read its replies: every 32 MiB read is answered
/// ENOMEM (errno 12), the heap can never hold its buffer.
fn expect_all_enomem(mut greedy: Child) {
    greedy.stdin.as_mut().unwrap().write_all(b"read\n").unwrap();
    let out = greedy.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "12:64",
        "replies to the greedy client (errno:count)"
    );
}

/// Copies the export with `nbdcopy --connections=N` (inside the namespace)
/// and compares the copy with the disk image.
fn copy_and_compare(tap: &NetnsTap, a: &Appliance, connections: u32, disk: &Path) {
    copy_uri_and_compare(
        tap,
        a,
        connections,
        disk,
        &format!("nbd://{}/disk0", NetnsTap::GUEST_IP),
    );
}

fn copy_uri_and_compare(tap: &NetnsTap, a: &Appliance, connections: u32, disk: &Path, uri: &str) {
    let copy = a.dir().join("copy.raw");
    let out = tap
        .exec("timeout")
        .arg("600")
        .arg("nbdcopy")
        .arg(format!("--connections={connections}"))
        .arg(uri)
        .arg(&copy)
        .output()
        .expect("nbdcopy");
    assert!(
        out.status.success(),
        "nbdcopy: {}{}\nconsole:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        a.console()
    );
    let cmp = Command::new("cmp").arg(disk).arg(&copy).output().unwrap();
    assert!(
        cmp.status.success(),
        "copy differs: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}

/// Boots on a tap with `memory`, one virtio-blk disk of random bytes
/// exported as `disk0`.
fn boot_small(
    memory: &str,
    extra: &str,
) -> Option<(NetnsTap, Appliance, PathBuf, tempfile::TempDir)> {
    boot_small_with(memory, extra, "", &[])
}

/// [`boot_small`] with `server_extra` appended to `--nbd-server`'s
/// options and `qemu_extra` QEMU arguments.
fn boot_small_with(
    memory: &str,
    extra: &str,
    server_extra: &str,
    qemu_extra: &[&str],
) -> Option<(NetnsTap, Appliance, PathBuf, tempfile::TempDir)> {
    let tap = match NetnsTap::create() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("skipped: no network namespace with a tap here: {e}");
            return None;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let disk = random_disk(dir.path());
    let cfg = QemuConfig {
        memory: memory.into(),
        append: export_append(
            &format!("{} {extra}", NetnsTap::GUEST_IP_SETTING),
            server_extra,
        ),
        disks: vec![disk.clone()],
        netns_tap: Some(tap.clone()),
        extra: qemu_extra.iter().map(|&a| a.into()).collect(),
        ..QemuConfig::default()
    };
    let a = Appliance::boot(&cfg);
    Some((tap, a, disk, dir))
}

/// The console after a clean `quit`: QEMU exits 0, nothing panicked.
fn quit_clean(mut a: Appliance) -> String {
    a.qmp().cmd("quit", Value::Null).expect("quit");
    let status = a.wait_exit(Duration::from_secs(60)).expect("QEMU exits");
    let console = a.console();
    assert_eq!(status.code(), Some(0), "console:\n{console}");
    assert!(!console.contains("PANIC"), "console:\n{console}");
    for line in console.lines() {
        if line.contains("heap at ready") || line.contains("network budgets") {
            eprintln!("{line}");
        }
    }
    console
}

#[test]
fn nbdcopy_4_connections_at_32m_beside_a_greedy_client() {
    let Some((tap, a, disk, _dir)) = boot_small("32M", "") else {
        return;
    };
    let greedy = start_greedy(&tap, None);
    copy_and_compare(&tap, &a, 4, &disk);
    // Still serving with the greedy client connected, and after it left.
    copy_and_compare(&tap, &a, 1, &disk);
    // With a 29 MiB heap no 32 MiB read can get its buffer.
    expect_all_enomem(greedy);
    copy_and_compare(&tap, &a, 4, &disk);
    let console = quit_clean(a);
    let heap = heap_at_ready(&console);
    assert!(heap <= 4096, "heap at ready {heap} KiB > 4 MiB:\n{console}");
}

/// TLS adds buffers to every connection: at `-m 24M` (a 20 MiB heap,
/// five clients) a greedy TLS client asking for 64 × 32 MiB without
/// reading, beside a 3-connection nbdcopy over TLS, gets `ENOMEM` for
/// each read while the copy is whole; nothing panics.
#[test]
fn tls_nbdcopy_at_24m_beside_a_greedy_tls_client() {
    let pki = harness::pki::Pki::new();
    let pem = |f: &str| String::from_utf8(pki.read(f)).expect("PEM is text");
    let object = serde_json::json!({
        "qom-type": "tls-creds-x509", "id": "tls0", "endpoint": "server",
        "verify-peer": false,
        "x-server-cert": pem("server-cert.pem"),
        "x-server-key": pem("server-key.pem"),
    });
    let Some((tap, a, disk, _dir)) = boot_small_with(
        "24M",
        &format!("--object {object}"),
        ",tls-creds=tls0",
        &["-cpu", "max"],
    ) else {
        return;
    };
    let ca = format!("{}/ca-cert.pem", pki.path("anon"));
    let greedy = start_greedy(&tap, Some(&ca));
    let uri = format!(
        "nbds://{}/disk0?tls-certificates={}",
        NetnsTap::GUEST_IP,
        pki.path("anon")
    );
    copy_uri_and_compare(&tap, &a, 3, &disk, &uri);
    expect_all_enomem(greedy);
    copy_uri_and_compare(&tap, &a, 3, &disk, &uri);
    quit_clean(a);
}

#[test]
fn nbdcopy_one_connection_at_24m() {
    let Some((tap, a, disk, _dir)) = boot_small("24M", "") else {
        return;
    };
    copy_and_compare(&tap, &a, 1, &disk);
    let console = quit_clean(a);
    let heap = heap_at_ready(&console);
    assert!(heap <= 4096, "heap at ready {heap} KiB > 4 MiB:\n{console}");
}

/// A panic inside the network poll, with the network borrowed by the main
/// loop: the halt sequence still closes the export, closes every node and
/// flushes the disk, then takes the failure exit (no second panic).
#[test]
fn a_panic_inside_the_network_poll_still_runs_the_halt_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let disk = random_disk(dir.path());
    let port = free_port();
    let cfg = QemuConfig {
        append: export_append("blockhaus.test-fault=panic-in-net-poll", ""),
        disks: vec![disk],
        nbd_port: Some(port),
        ..QemuConfig::default()
    };
    let mut a = Appliance::boot(&cfg);
    // The connection makes the poll panic; the client's own outcome is moot.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let _ = s.write_all(&[0; 4]);
    let status = a.wait_exit(Duration::from_secs(60)).expect("QEMU exits");
    let console = a.console();
    assert_eq!(status.code(), Some(FAILURE_EXIT_STATUS), "{console}");
    assert!(
        console.contains("test fault: panic inside the network poll"),
        "{console}"
    );
    assert!(!console.contains("during the halt sequence"), "{console}");
    assert!(
        console.contains("=== block layer closed ==="),
        "no close-all:\n{console}"
    );
    assert!(
        console.contains("device 'disk0': flushed"),
        "no flush:\n{console}"
    );
    let report = &console[console
        .find("=== halt sequence done ===")
        .unwrap_or_else(|| panic!("no halt report:\n{console}"))..];
    assert!(
        report.lines().any(|l| l.trim_end() == "exports closed: e0"),
        "{console}"
    );
}

/// A write of 32 MiB at `memory`, answered `ENOMEM` after its payload is
/// skipped; the same connection then writes and flushes normally, and that
/// write is on the disk.
fn write_32m_is_enomem(memory: &str) {
    let Some((tap, a, disk, _dir)) = boot_small(memory, "") else {
        return;
    };
    let script = r#"
try:
    h.pwrite(b"\xab" * (32 << 20), 0)
    print("large: ok")
except nbd.Error as e:
    print("large: errno", e.errno)
h.pwrite(b"\xcd" * 65536, 0)
h.flush()
print("small: ok")
"#;
    let out = tap
        .exec("timeout")
        // nbdsh, with the system Python that has libnbd's module.
        .args(["300", "/usr/bin/python3", "-m", "nbd", "-u"])
        .arg(format!("nbd://{}/disk0", NetnsTap::GUEST_IP))
        .args(["-c", script])
        .output()
        .expect("nbdsh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.trim(),
        "large: errno ENOMEM\nsmall: ok",
        "console:\n{}",
        a.console()
    );
    quit_clean(a);
    let check = run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0xcd 0 64k"])
        .arg(&disk));
    assert!(!check.contains("Pattern verification failed"), "{check}");
}

/// 32 MiB cannot be allocated from a 29 MiB heap at all.
#[test]
fn a_write_too_large_for_the_heap_is_answered_enomem() {
    write_32m_is_enomem("32M");
}

/// A 37 MiB heap could hold the payload, but only by eating into the
/// reserve the rest of the appliance needs.
#[test]
fn a_write_that_would_eat_the_reserve_is_answered_enomem() {
    write_32m_is_enomem("40M");
}
