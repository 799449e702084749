//! The NBD client engine (`block::nbd::client`) behind the std adapter
//! (`harness::nbd_client`), against real servers on the host: qemu-nbd
//! over a raw image made by qemu-img, and nbdkit's memory plugin. Every
//! assertion is on bytes read back through the engine, on what the server
//! stored (checked with qemu-io on the image), or on the block status the
//! server reported.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use block::io::IoError;
use block::nbd::client::{ClientOp, ClientReply, ClientState};
use block::nbd::wire::transmission_flags as tf;
use harness::nbd_client::NbdClient;
use harness::qemu::free_port;

const MIB: u64 = 1 << 20;

/// A server process killed and reaped on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `cmd` (which listens on `port`) and wait until it accepts.
fn start(mut cmd: Command, port: u16) -> Server {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let mut server = Server {
        child,
        addr: format!("127.0.0.1:{port}"),
    };
    // The readiness probe below is a connection that closes at once.
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(&server.addr).is_err() {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("{cmd:?} exited: {status}");
        }
        assert!(Instant::now() < deadline, "{cmd:?} never listened");
        thread::sleep(Duration::from_millis(50));
    }
    server
}

fn qemu_nbd(image: &Path, extra: &[&str]) -> Server {
    let port = free_port();
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "raw", "-x", "disk", "-b", "127.0.0.1", "-t"])
        .arg("-p")
        .arg(port.to_string())
        .args(extra)
        .arg(image);
    start(cmd, port)
}

fn nbdkit_memory(size: &str) -> Server {
    let port = free_port();
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "-i", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(["memory", size]);
    start(cmd, port)
}

fn image(dir: &tempfile::TempDir, size: u64) -> std::path::PathBuf {
    let path = dir.path().join("disk.raw");
    harness::host::create(&path, size);
    path
}

/// qemu-io on the host image (read-only): every pattern check must pass.
fn check_image(img: &Path, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", "-r"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = cmd.arg(img).output().expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("verification failed"),
        "{text}"
    );
}

fn status(c: &mut NbdClient, offset: u64, len: u32) -> block::io::BlockStatus {
    match c.run(ClientOp::BlockStatus { offset, len }) {
        Ok(ClientReply::Status(s)) => s,
        other => panic!("block status at {offset}: {other:?}"),
    }
}

fn read(c: &mut NbdClient, offset: u64, len: u32) -> Vec<u8> {
    match c.run(ClientOp::Read { offset, len }) {
        Ok(ClientReply::Data(d)) => d,
        other => panic!("read at {offset}: {other:?}"),
    }
}

/// Write, read back, block status, flush, trim and zero against `c`; the
/// export is at least 4 MiB and starts empty.
fn exercise(c: &mut NbdClient) {
    let info = c.info();
    assert!(
        info.structured && info.base_allocation.is_some(),
        "{info:?}"
    );
    for flag in [
        tf::SEND_FLUSH,
        tf::SEND_FUA,
        tf::SEND_TRIM,
        tf::SEND_WRITE_ZEROES,
    ] {
        assert!(info.has(flag), "flag {flag:#x} missing: {info:?}");
    }
    let s = status(c, MIB, 64 * 1024);
    assert!(!s.data && s.zero, "fresh export is a hole: {s:?}");

    // 16 writes in flight at once, then one read over all of them.
    let mut handles = Vec::new();
    for i in 0..16u64 {
        let op = ClientOp::Write {
            offset: MIB + i * 65536,
            data: vec![0xa0 + i as u8; 65536],
            fua: i == 15,
        };
        handles.push(c.submit(op).expect("submit"));
    }
    for h in handles {
        assert_eq!(c.wait(h), Ok(ClientReply::Done));
    }
    let data = read(c, MIB, 16 * 65536);
    for (i, chunk) in data.chunks(65536).enumerate() {
        assert!(chunk.iter().all(|&b| b == 0xa0 + i as u8), "chunk {i}");
    }
    let s = status(c, MIB, 65536);
    assert!(s.data && !s.zero, "written range is data: {s:?}");
    // A read across a hole and data.
    let data = read(c, MIB - 4096, 8192);
    assert!(data[..4096].iter().all(|&b| b == 0));
    assert!(data[4096..].iter().all(|&b| b == 0xa0));
    assert_eq!(c.run(ClientOp::Flush), Ok(ClientReply::Done));

    let trim = ClientOp::Trim {
        offset: MIB,
        len: 65536,
        fua: false,
    };
    assert_eq!(c.run(trim), Ok(ClientReply::Done));
    let s = status(c, MIB, 65536);
    assert!(!s.data, "trimmed range is a hole: {s:?}");
    let zero = ClientOp::WriteZeroes {
        offset: MIB + 65536,
        len: 65536,
        fua: false,
        may_unmap: false,
        fast: false,
    };
    assert_eq!(c.run(zero), Ok(ClientReply::Done));
    assert!(read(c, MIB + 65536, 65536).iter().all(|&b| b == 0));
    assert_eq!(c.run(ClientOp::Flush), Ok(ClientReply::Done));
}

/// The node called `name` in `query-named-block-nodes`.
fn named_node(a: &mut harness::Appliance, name: &str) -> serde_json::Value {
    let nodes = a
        .qmp()
        .cmd("query-named-block-nodes", serde_json::Value::Null)
        .unwrap();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == name)
        .unwrap_or_else(|| panic!("no node {name}: {nodes}"))
        .clone()
}

#[test]
fn qemu_nbd_serves_the_client_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(&dir, 16 * MIB);
    {
        let srv = qemu_nbd(&img, &["--discard=unmap"]);
        let mut c = NbdClient::connect(&srv.addr, "disk").expect("open");
        assert_eq!(c.info().size, 16 * MIB);
        exercise(&mut c);
        c.disconnect().expect("clean close");
    }
    // What the engine wrote is in the host image.
    check_image(
        &img,
        &["read -P 0xa2 1179648 65536", "read -P 0 1048576 131072"],
    );
}

#[test]
fn nbdkit_memory_serves_the_client_engine() {
    let srv = nbdkit_memory("64M");
    let mut c = NbdClient::connect(&srv.addr, "").expect("open");
    assert_eq!(c.info().size, 64 * MIB);
    exercise(&mut c);
    c.disconnect().expect("clean close");
}

#[test]
fn read_only_qemu_nbd_export_is_opened_read_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(&dir, 4 * MIB);
    let srv = qemu_nbd(&img, &["-r"]);
    let mut c = NbdClient::connect(&srv.addr, "disk").expect("open");
    assert!(c.info().read_only());
    let w = ClientOp::Write {
        offset: 0,
        data: vec![1; 512],
        fua: false,
    };
    assert_eq!(c.run(w), Err(IoError::Eperm));
    assert_eq!(read(&mut c, 0, 512), vec![0; 512]);
}

#[test]
fn unknown_export_on_qemu_nbd_fails_the_open_with_qemus_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(&dir, 4 * MIB);
    let srv = qemu_nbd(&img, &[]);
    let e = NbdClient::connect(&srv.addr, "nope")
        .err()
        .expect("refused");
    assert!(e.starts_with("Requested export not available"), "{e}");
}

#[test]
fn server_killed_mid_session_fails_requests_with_eio() {
    let mut srv = nbdkit_memory("16M");
    let mut c = NbdClient::connect(&srv.addr, "").expect("open");
    assert_eq!(read(&mut c, 0, 4096), vec![0; 4096]);
    let _ = srv.child.kill();
    let _ = srv.child.wait();
    assert_eq!(
        c.run(ClientOp::Read {
            offset: 0,
            len: 4096
        }),
        Err(IoError::Eio)
    );
    assert_eq!(c.state(), &ClientState::Failed);
}

/// The appliance's `driver=nbd` node over a host qemu-nbd (reached at
/// 10.0.2.2 through QEMU's user network), exported again by the
/// appliance's own NBD server: a host qemu-io writes through the
/// appliance, the data lands in qemu-nbd's image, holes show through both
/// hops, and `quit` closes the node cleanly.
#[test]
fn appliance_nbd_node_over_host_qemu_nbd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(&dir, 16 * MIB);
    // QEMU's user network takes the guest's 10.0.2.2 to the host's
    // loopback.
    let srv = qemu_nbd(&img, &[]);
    let remote_port = srv.addr.rsplit(':').next().unwrap().to_string();
    let port = free_port();
    let cfg = harness::QemuConfig {
        append: "--nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809".into(),
        nbd_port: Some(port),
        ..harness::QemuConfig::default()
    };
    let mut a = harness::Appliance::boot(&cfg);
    a.qmp()
        .cmd(
            "blockdev-add",
            serde_json::json!({"driver": "nbd", "node-name": "remote", "export": "disk",
                   "server": {"type": "inet", "host": "10.0.2.2", "port": remote_port}}),
        )
        .unwrap_or_else(|e| panic!("blockdev-add: {e}\n{}", a.console()));
    let node = named_node(&mut a, "remote");
    assert_eq!(node["drv"], "nbd", "{node}");
    assert_eq!(node["image"]["virtual-size"], 16 * MIB, "{node}");
    assert_eq!(
        node["image"]["format-specific"]["data"]["x-state"], "connected",
        "{node}"
    );
    // qemu-nbd 7.2 refuses extended headers: the fallback.
    assert_eq!(
        node["image"]["format-specific"]["data"]["x-headers"], "structured",
        "{node}"
    );
    a.qmp()
        .cmd(
            "block-export-add",
            serde_json::json!({"type": "nbd", "id": "e", "node-name": "remote",
                               "writable": true}),
        )
        .unwrap();
    let uri = format!("nbd://127.0.0.1:{port}/remote");
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 256k",
            "-c",
            "flush",
            "-c",
        ])
        .arg("read -P 0x5a 1M 256k")
        .args(["-c", "read -P 0 0 64k"])
        .arg(&uri)
        .output()
        .expect("qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("verification failed") && !text.contains("failed:"),
        "{text}\n{}",
        a.console()
    );
    // Block status through both hops: a hole, the data, a hole (QEMU
    // allocates a raw image's first 4 KiB when it creates it).
    let map = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(&uri)
        .output()
        .expect("qemu-img map");
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).expect("map json");
    let data_at = |off: u64| {
        map.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                let s = e["start"].as_u64().unwrap();
                s <= off && off < s + e["length"].as_u64().unwrap()
            })
            .map(|e| e["data"] == true)
            .unwrap()
    };
    assert!(
        !data_at(512 * 1024) && data_at(MIB) && !data_at(8 * MIB),
        "{map}"
    );
    a.quit();
    drop(srv);
    check_image(&img, &["read -P 0x5a 1M 256k", "read -P 0 0 1M"]);
}

/// Without a network device the open fails instead of waiting.
#[test]
fn appliance_without_a_network_fails_the_open() {
    let mut a = harness::Appliance::boot(&harness::QemuConfig::default());
    let err = a
        .qmp()
        .cmd(
            "blockdev-add",
            serde_json::json!({"driver": "nbd", "node-name": "remote",
                   "server": {"type": "inet", "host": "10.0.2.2", "port": "10809"}}),
        )
        .unwrap_err();
    assert!(err.contains("Network is unreachable"), "{err}");
    a.quit();
}

/// `quit` closes an appliance's `driver=nbd` node with `NBD_CMD_DISC`
/// (nbdkit's debug log says which command ended the connection), and the
/// node's writes reached the server before.
#[test]
fn appliance_quit_sends_nbd_cmd_disc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("nbdkit.log");
    let port = free_port();
    let mut cmd = Command::new("nbdkit");
    cmd.args(["-f", "-v", "-i", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(["memory", "16M"])
        .stderr(std::fs::File::create(&log).expect("log file"));
    let srv = start(cmd, port);
    let cfg = harness::QemuConfig {
        nbd_port: Some(free_port()),
        ..harness::QemuConfig::default()
    };
    let mut a = harness::Appliance::boot(&cfg);
    a.qmp()
        .cmd(
            "blockdev-add",
            serde_json::json!({"driver": "nbd", "node-name": "remote",
                   "server": {"type": "inet", "host": "10.0.2.2", "port": port.to_string()}}),
        )
        .unwrap_or_else(|e| panic!("blockdev-add: {e}\n{}", a.console()));
    let out = a.qemu_io("remote", "write -P 0x33 0 64k");
    assert!(out.starts_with("wrote"), "{out}");
    let mut c = NbdClient::connect(&srv.addr, "").expect("second client");
    assert!(read(&mut c, 0, 65536).iter().all(|&b| b == 0x33));
    c.disconnect().expect("clean close");
    let before = std::fs::read_to_string(&log).unwrap_or_default();
    let discs = |t: &str| t.matches("client sent NBD_CMD_DISC").count();
    // The test client's (its disconnect waited for the server to close).
    assert_eq!(discs(&before), 1, "{before}");
    a.quit();
    // nbdkit logs from its connection thread: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let after = std::fs::read_to_string(&log).unwrap_or_default();
        if discs(&after) == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no NBD_CMD_DISC from the appliance:\n{after}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// A host port nobody listens on: the open fails with QEMU's text, the
/// appliance keeps serving, and `open-timer` retries until its bound.
#[test]
fn appliance_nbd_node_on_a_closed_port_fails_the_open() {
    let cfg = harness::QemuConfig {
        nbd_port: Some(free_port()),
        ..harness::QemuConfig::default()
    };
    let mut a = harness::Appliance::boot(&cfg);
    let closed = free_port().to_string();
    for timer in [0, 2] {
        let err = a
            .qmp()
            .cmd(
                "blockdev-add",
                serde_json::json!({"driver": "nbd", "node-name": "remote", "open-timer": timer,
                       "server": {"type": "inet", "host": "10.0.2.2", "port": closed}}),
            )
            .unwrap_err();
        assert!(
            err.contains(&format!(
                "Failed to connect to '10.0.2.2:{closed}': Connection refused"
            )),
            "{err}\n{}",
            a.console()
        );
    }
    a.quit();
}

/// `reconnect-delay`: the host qemu-nbd is killed and started again on
/// the same port; a write through the appliance's node waits for the
/// reconnect and lands in the image. Without the server, a read fails
/// with EIO once the delay is over.
#[test]
fn appliance_nbd_node_reconnects_to_a_restarted_qemu_nbd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(&dir, 16 * MIB);
    let srv = qemu_nbd(&img, &[]);
    let remote_port: u16 = srv.addr.rsplit(':').next().unwrap().parse().unwrap();
    let cfg = harness::QemuConfig {
        nbd_port: Some(free_port()),
        ..harness::QemuConfig::default()
    };
    let mut a = harness::Appliance::boot(&cfg);
    a.qmp()
        .cmd(
            "blockdev-add",
            serde_json::json!({"driver": "nbd", "node-name": "remote", "export": "disk",
                   "reconnect-delay": 2,
                   "server": {"type": "inet", "host": "10.0.2.2",
                              "port": remote_port.to_string()}}),
        )
        .unwrap_or_else(|e| panic!("blockdev-add: {e}\n{}", a.console()));
    let out = a.qemu_io("remote", "write -P 0x11 0 64k");
    assert!(out.starts_with("wrote"), "{out}");
    drop(srv);
    // Nobody listens: the read waits out the delay, then fails.
    let out = a.qemu_io_output("remote", "read 0 4k");
    assert!(out.contains("Input/output error"), "{out}");
    // The server is back on the same port: the node reconnects.
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "raw", "-x", "disk", "-b", "127.0.0.1", "-t", "-p"])
        .arg(remote_port.to_string())
        .arg(&img);
    let srv = start(cmd, remote_port);
    // Past the delay a request fails at once and starts another attempt;
    // the node is back once one succeeds.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = a.qemu_io_output("remote", "write -P 0x22 64k 64k");
        if out.starts_with("wrote") {
            break;
        }
        assert!(out.contains("Input/output error"), "{out}");
        assert!(
            Instant::now() < deadline,
            "never reconnected:\n{}",
            a.console()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let out = a.qemu_io("remote", "read -P 0x11 0 64k");
    assert!(out.starts_with("read"), "{out}");
    a.quit();
    drop(srv);
    check_image(&img, &["read -P 0x11 0 64k", "read -P 0x22 64k 64k"]);
}

/// How the scripted server misbehaves.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Close the connection after this many bytes of its output.
    CloseAt(usize),
    /// Corrupt the byte at this offset of its output (all bits flipped),
    /// then close once the client has been quiet for half a second (a
    /// corrupted length can leave both sides waiting for the other).
    GarbageAt(usize),
    /// A correct handshake, then requests are read and never answered
    /// (a server that stopped answering).
    Silent,
}

/// What a scripted server saw.
#[derive(Default)]
struct Seen {
    /// Requests (`NBD_CMD_DISC` aside).
    requests: AtomicUsize,
    /// `NBD_CMD_DISC`.
    disc: AtomicBool,
}

/// A scripted misbehaving server for iotest 083's matrix: the NBD server
/// engine over a 1 MiB zero export named `disk`, with its output cut or
/// corrupted at one byte. Serves one connection at a time until dropped;
/// returns the port, the flag that stops it and what it saw.
fn misbehaving_server(fault: Fault) -> (u16, Arc<AtomicBool>, Arc<Seen>) {
    use block::nbd::{Completion, Connection, Export, Limits, Op};
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let seen = Arc::new(Seen::default());
    let seen2 = seen.clone();
    thread::spawn(move || {
        let exports = vec![Export::new("disk", MIB)];
        while !stop2.load(Ordering::Relaxed) {
            let Ok((mut s, _)) = listener.accept() else {
                thread::sleep(Duration::from_millis(20));
                continue;
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut conn = Connection::new(Limits::default());
            let mut sent = 0usize;
            let mut idle = 0;
            let mut buf = vec![0u8; 65536];
            'conn: while !stop2.load(Ordering::Relaxed) {
                loop {
                    let out: Vec<u8> = conn.output().chunks().flatten().copied().collect();
                    if out.is_empty() {
                        break;
                    }
                    conn.consume_output(out.len());
                    let mut out = out;
                    match fault {
                        Fault::CloseAt(n) => {
                            if sent + out.len() >= n {
                                let _ = s.write_all(&out[..n - sent]);
                                break 'conn;
                            }
                        }
                        Fault::GarbageAt(n) => {
                            if (sent..sent + out.len()).contains(&n) {
                                out[n - sent] ^= 0xff;
                            }
                        }
                        Fault::Silent => {}
                    }
                    sent += out.len();
                    if s.write_all(&out).is_err() {
                        break 'conn;
                    }
                }
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        idle = 0;
                        conn.receive(&buf[..n], &exports);
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut =>
                    {
                        idle += 1;
                        if matches!(fault, Fault::GarbageAt(n) if n < sent) && idle >= 10 {
                            break;
                        }
                    }
                    Err(_) => break,
                }
                while let Some(r) = conn.next_request() {
                    seen2.requests.fetch_add(1, Ordering::Relaxed);
                    if matches!(fault, Fault::Silent) {
                        continue;
                    }
                    let c = match r.op {
                        Op::Read { .. } => Completion::Zero,
                        Op::BlockStatus { len, .. } => {
                            Completion::Extent(block::io::BlockStatus::zero(len))
                        }
                        _ => Completion::Done,
                    };
                    let _ = conn.complete(r.id, c);
                }
                if conn.close_reason() == Some(&block::nbd::CloseReason::Disconnect) {
                    seen2.disc.store(true, Ordering::Relaxed);
                }
                if conn.should_close() {
                    break;
                }
            }
        }
    });
    (port, stop, seen)
}

/// The length of a full handshake from the scripted server (greeting to
/// the `NBD_OPT_GO` ACK), as our engine negotiates it.
fn handshake_len() -> usize {
    use block::nbd::client::Client;
    use block::nbd::{Connection, Export, Limits};
    let exports = vec![Export::new("disk", MIB)];
    let mut server = Connection::new(Limits::default());
    let mut client = Client::new("disk", true);
    let mut total = 0;
    for _ in 0..20 {
        let out: Vec<u8> = server.output().chunks().flatten().copied().collect();
        server.consume_output(out.len());
        total += out.len();
        client.receive(&out);
        let back = client.output().to_vec();
        client.consume_output(back.len());
        server.receive(&back, &exports);
    }
    assert!(client.info().is_some());
    total
}

/// QEMU iotest 083's matrix against the appliance: a server that closes
/// or sends garbage at each point of the handshake fails `blockdev-add`
/// with an error (never a hang, never a crash), and one that closes in
/// the middle of a reply fails the request with EIO; the appliance keeps
/// serving and halts cleanly.
#[test]
fn appliance_nbd_node_against_a_misbehaving_server() {
    let cfg = harness::QemuConfig {
        nbd_port: Some(free_port()),
        ..harness::QemuConfig::default()
    };
    let mut a = harness::Appliance::boot(&cfg);
    let len = handshake_len();
    let mut cuts: Vec<usize> = vec![0, 1, 8, 16, 17, 18, len - 1];
    cuts.extend((1..12).map(|i| 18 + i * (len - 18) / 12));
    let add = |a: &mut harness::Appliance, port: u16| {
        a.qmp().cmd(
            "blockdev-add",
            serde_json::json!({"driver": "nbd", "node-name": "bad", "export": "disk",
                   "server": {"type": "inet", "host": "10.0.2.2", "port": port.to_string()}}),
        )
    };
    // The open's error is a QMP error reply, not a timeout (the harness
    // gives up on a command after 30 s of silence).
    let refused = |a: &harness::Appliance, what: &str, e: String| {
        assert!(
            e.contains("\"GenericError\""),
            "{what}: {e}\n{}",
            a.console()
        );
    };
    for &cut in &cuts {
        let (port, stop, _) = misbehaving_server(Fault::CloseAt(cut));
        match add(&mut a, port) {
            Ok(_) => panic!("close at {cut} of {len}: opened"),
            Err(e) => refused(&a, &format!("close at {cut} of {len}"), e),
        }
        stop.store(true, Ordering::Relaxed);
        let (port, stop, _) = misbehaving_server(Fault::GarbageAt(cut));
        // Garbage in a size or flag may still open; it must settle.
        match add(&mut a, port) {
            Ok(_) => {
                a.qmp()
                    .cmd("blockdev-del", serde_json::json!({"node-name": "bad"}))
                    .unwrap();
            }
            Err(e) => refused(&a, &format!("garbage at {cut} of {len}"), e),
        }
        stop.store(true, Ordering::Relaxed);
    }
    // A reply cut short: the request fails, the node shows it.
    let (port, stop, _) = misbehaving_server(Fault::CloseAt(len + 10));
    add(&mut a, port).unwrap_or_else(|e| panic!("{e}\n{}", a.console()));
    let out = a.qemu_io_output("bad", "read 0 4k");
    assert!(out.contains("Input/output error"), "{out}");
    let bad = named_node(&mut a, "bad");
    assert_eq!(
        bad["image"]["format-specific"]["data"]["x-state"], "failed",
        "{bad}"
    );
    stop.store(true, Ordering::Relaxed);
    a.quit();
}

/// An appliance with an NBD server, exporting its disk `img` (if any)
/// writable as `disk` (node `vblk`); returns it and the host port its
/// server is forwarded to.
fn serving_appliance(img: Option<&Path>) -> (harness::Appliance, u16) {
    let mut append = String::from("--nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809");
    if img.is_some() {
        append += " --blockdev driver=virtio-blk,node-name=vblk,serial=disk0 \
                   --export type=nbd,id=e0,node-name=vblk,name=disk,writable=on";
    }
    let cfg = harness::QemuConfig {
        append,
        disks: img.map(Path::to_path_buf).into_iter().collect(),
        nbd_port: Some(free_port()),
        ..harness::QemuConfig::default()
    };
    let port = cfg.nbd_port.unwrap();
    (harness::Appliance::boot(&cfg), port)
}

/// `blockdev-add driver=nbd` named `node` to export `disk` on the host's
/// `port` (the guest's 10.0.2.2), with `extra` options.
fn add_nbd_node(a: &mut harness::Appliance, node: &str, port: u16, extra: serde_json::Value) {
    let mut args = serde_json::json!({"driver": "nbd", "node-name": node, "export": "disk",
        "server": {"type": "inet", "host": "10.0.2.2", "port": port.to_string()}});
    if let (Some(args), Some(extra)) = (args.as_object_mut(), extra.as_object()) {
        args.extend(extra.clone());
    }
    a.qmp()
        .cmd("blockdev-add", args)
        .unwrap_or_else(|e| panic!("blockdev-add {node}: {e}\n{}", a.console()));
}

/// The halt with requests in flight to a server that stopped answering
/// (it took the handshake, then reads requests and never replies): `quit`
/// still ends with exit 0 and every node closed (the appliance gives such
/// requests 5 s, then fails them and sends NBD_CMD_DISC, which the server
/// gets), and a write to
/// another export, acknowledged but never flushed by its client, is on
/// the disk image afterwards.
#[test]
fn appliance_quit_with_requests_in_flight_to_a_silent_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(&dir, 16 * MIB);
    let (silent_port, stop, seen) = misbehaving_server(Fault::Silent);
    let (mut a, port) = serving_appliance(Some(&img));
    add_nbd_node(
        &mut a,
        "remote",
        silent_port,
        serde_json::json!({"reconnect-delay": 300}),
    );
    a.qmp()
        .cmd(
            "block-export-add",
            serde_json::json!({"type": "nbd", "id": "r", "node-name": "remote",
                               "name": "remote"}),
        )
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    // Acknowledged, not flushed: the halt's device flush must keep it.
    let mut writer = NbdClient::connect(&addr, "disk").expect("open disk");
    let w = ClientOp::Write {
        offset: MIB,
        data: vec![0x5a; 256 * 1024],
        fua: false,
    };
    assert_eq!(writer.run(w), Ok(ClientReply::Done));
    // Reads through the remote node, forwarded to the silent server.
    let mut reader = NbdClient::connect(&addr, "remote").expect("open remote");
    for i in 0..4 {
        let r = ClientOp::Read {
            offset: i * 65536,
            len: 65536,
        };
        reader.submit(r).expect("submit");
    }
    reader.send().expect("send");
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.requests.load(Ordering::Relaxed) < 4 {
        assert!(
            Instant::now() < deadline,
            "the reads never reached the server:\n{}",
            a.console()
        );
        thread::sleep(Duration::from_millis(50));
    }
    a.quit();
    // The abandoned link's NBD_CMD_DISC (the server reads it on its own
    // thread: give it a moment).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.disc.load(Ordering::Relaxed) {
        assert!(
            Instant::now() < deadline,
            "no NBD_CMD_DISC from the appliance"
        );
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    drop((writer, reader));
    check_image(&img, &["read -P 0x5a 1M 256k", "read -P 0 0 1M"]);
}

/// Live storage migration between two appliances (issue 16, point 4): A
/// exports its disk; a host client writes through that export before,
/// during and after A mirrors the disk (`blockdev-add driver=nbd` to B's
/// export, `blockdev-mirror` sync=full, ready, `job-complete`) onto B.
/// After the pivot A's export is served from B: B's image holds every
/// acknowledged write, and A's disk misses the writes after the pivot.
/// The appliances reach each other through QEMU's user network (A's
/// 10.0.2.2 is the host, where B's NBD port is forwarded).
#[test]
fn appliance_migrates_a_disk_to_another_appliance_under_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 16 * MIB;
    let img_a = dir.path().join("a.raw");
    let img_b = dir.path().join("b.raw");
    harness::host::create(&img_a, size);
    harness::host::create(&img_b, size);
    let (mut a, a_port) = serving_appliance(Some(&img_a));
    let (b, b_port) = serving_appliance(Some(&img_b));
    let mut model = vec![0u8; size as usize];
    let mut client = NbdClient::connect(&format!("127.0.0.1:{a_port}"), "disk").expect("open A");
    let write = |c: &mut NbdClient, model: &mut Vec<u8>, offset: u64, len: usize, p: u8| {
        let w = ClientOp::Write {
            offset,
            data: vec![p; len],
            fua: false,
        };
        assert_eq!(c.run(w), Ok(ClientReply::Done), "write {p:#x} at {offset}");
        model[offset as usize..offset as usize + len].fill(p);
    };
    // Before the migration.
    write(&mut client, &mut model, 0, 8 * MIB as usize, 0x11);
    add_nbd_node(&mut a, "target", b_port, serde_json::json!({}));
    let target = named_node(&mut a, "target");
    assert_eq!(
        target["image"]["format-specific"]["data"]["x-headers"], "extended",
        "{target}"
    );
    a.qmp()
        .cmd(
            "blockdev-mirror",
            serde_json::json!({"job-id": "m", "device": "vblk", "target": "target",
                               "sync": "full"}),
        )
        .unwrap_or_else(|e| panic!("blockdev-mirror: {e}\n{}", a.console()));
    // During the copy (or right after it: the job may be quick).
    for k in 0..16u64 {
        write(
            &mut client,
            &mut model,
            k * 640 * 1024,
            64 * 1024,
            0x20 + k as u8,
        );
    }
    let ready = a
        .qmp()
        .wait_event("BLOCK_JOB_READY", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("no BLOCK_JOB_READY: {e}\n{}", a.console()));
    assert_eq!(ready["data"]["device"], "m", "{ready}");
    // While ready: mirrored to both.
    write(&mut client, &mut model, 9 * MIB, MIB as usize, 0x44);
    a.qmp()
        .cmd("job-complete", serde_json::json!({"id": "m"}))
        .unwrap();
    let done = a
        .qmp()
        .wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(120))
        .unwrap();
    assert!(done["data"].get("error").is_none(), "{done}");
    // After the pivot: served from B only.
    write(&mut client, &mut model, 12 * MIB, MIB as usize, 0x77);
    let back = client.run(ClientOp::Read {
        offset: 12 * MIB,
        len: 65536,
    });
    assert_eq!(back, Ok(ClientReply::Data(vec![0x77; 65536])));
    client.disconnect().expect("clean close");
    a.quit();
    b.quit();
    let on_b = std::fs::read(&img_b).expect("B's image");
    let first_diff = on_b.iter().zip(&model).position(|(x, y)| x != y);
    assert_eq!(
        first_diff, None,
        "B's image differs from what the client wrote"
    );
    // A's own disk kept what was written before the pivot only.
    check_image(&img_a, &["read -P 0x44 9M 1M", "read -P 0 12M 1M"]);
}

/// Replication (issue 16, point 5): a `quorum` (vote-threshold 2) over
/// three `driver=nbd` children, each another appliance's disk, exported
/// by a fourth. A host client writes through that export while one of
/// the three appliances is killed: every write is acknowledged, the
/// quorum reports the dead child with `QUORUM_REPORT_BAD`, and the two
/// survivors' images hold every acknowledged write.
#[test]
fn appliance_quorum_over_three_appliances_survives_one_killed_mid_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 16 * MIB;
    let mut replicas = Vec::new();
    for i in 0..3 {
        let img = dir.path().join(format!("r{i}.raw"));
        harness::host::create(&img, size);
        let (a, port) = serving_appliance(Some(&img));
        replicas.push((Some(a), port, img));
    }
    let (mut q, q_port) = serving_appliance(None);
    for (i, (_, port, _)) in replicas.iter().enumerate() {
        add_nbd_node(&mut q, &format!("c{i}"), *port, serde_json::json!({}));
    }
    q.qmp()
        .cmd(
            "blockdev-add",
            serde_json::json!({"driver": "quorum", "node-name": "q0", "vote-threshold": 2,
                               "children": ["c0", "c1", "c2"]}),
        )
        .unwrap_or_else(|e| panic!("quorum: {e}\n{}", q.console()));
    q.qmp()
        .cmd(
            "block-export-add",
            serde_json::json!({"type": "nbd", "id": "e", "node-name": "q0",
                               "name": "q", "writable": true}),
        )
        .unwrap();
    let chunk = 256 * 1024usize;
    let writes = 32u64;
    let acked = AtomicUsize::new(0);
    let killed = AtomicBool::new(false);
    let mut victim = replicas[2].0.take();
    thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut c = NbdClient::connect(&format!("127.0.0.1:{q_port}"), "q").expect("open q");
            for k in 0..writes {
                // At least the last write goes out after the kill.
                while k == writes - 1 && !killed.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(5));
                }
                let w = ClientOp::Write {
                    offset: k * chunk as u64,
                    data: vec![0x40 + k as u8; chunk],
                    fua: false,
                };
                assert_eq!(c.run(w), Ok(ClientReply::Done), "write {k}");
                acked.fetch_add(1, Ordering::Relaxed);
            }
            assert_eq!(c.run(ClientOp::Flush), Ok(ClientReply::Done), "flush");
            c.disconnect().expect("clean close");
        });
        // Kill the third replica once a quarter of the writes is in.
        while acked.load(Ordering::Relaxed) < writes as usize / 4 && !writer.is_finished() {
            thread::sleep(Duration::from_millis(5));
        }
        drop(victim.take());
        killed.store(true, Ordering::Relaxed);
        writer.join().expect("every write acknowledged");
    });
    let bad = q
        .qmp()
        .wait_event("QUORUM_REPORT_BAD", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("no QUORUM_REPORT_BAD: {e}\n{}", q.console()));
    assert_eq!(bad["data"]["node-name"], "c2", "{bad}");
    q.quit();
    for (a, _, img) in replicas.iter_mut().take(2) {
        a.take().expect("survivor").quit();
        let data = std::fs::read(&*img).expect("image");
        for k in 0..writes as usize {
            let at = k * chunk;
            assert!(
                data[at..at + chunk].iter().all(|&b| b == 0x40 + k as u8),
                "{}: write {k} lost",
                img.display()
            );
        }
    }
}
