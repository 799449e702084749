//! The NBD server in the booted appliance (issue 5): virtio-net, smoltcp,
//! the `block::nbd` engine and the exports, reached from the host through
//! QEMU's user network (`hostfwd`) — and through a tap device in a network
//! namespace where root allows — by real clients (qemu-io, qemu-img,
//! nbdinfo, nbdcopy) and by a raw socket. Data disks are real images made
//! with `qemu-img` (virtio-blk, scsi-hd, qcow2 over virtio-blk); what a
//! client saw acknowledged is checked on the host image after `quit`.
//!
//! Covered: boot options and QMP commands with QEMU's texts, the export
//! lifecycle (safe/hard delete, `nbd-server-stop`, legacy add/remove),
//! `block_resize` refused on an exported node, block status against the
//! image's allocation, bad and vanishing clients next to a good one,
//! eight clients at once, `max-connections`, the halt path with writes in
//! flight, gratuitous ARP and ICMP echo on tap.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use harness::host::{MIB, QemuIoSession, create, qemu_io};
use harness::qemu::free_port;
use harness::{Appliance, QemuConfig};
use serde_json::{Value, json};

const NBD_SERVER: &str = "--nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809";

fn boot(append: &str, disks: Vec<std::path::PathBuf>) -> (Appliance, u16) {
    let port = free_port();
    let cfg = QemuConfig {
        append: append.into(),
        disks,
        nbd_port: Some(port),
        ..QemuConfig::default()
    };
    (Appliance::boot(&cfg), port)
}

fn uri(port: u16, name: &str) -> String {
    format!("nbd://127.0.0.1:{port}/{name}")
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs a client; panics with its output and the console if it fails.
fn client(a: &Appliance, cmd: &mut Command) -> String {
    let o = output(cmd);
    let t = text(&o);
    assert!(
        o.status.success(),
        "{cmd:?} failed:\n{t}\nconsole:\n{}",
        a.console()
    );
    t
}

/// `qemu-io` on an NBD URI; every pattern check must pass.
fn qemu_io_nbd(a: &Appliance, uri: &str, cmds: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(uri);
    let out = client(a, &mut cmd);
    let lower = out.to_lowercase();
    assert!(
        !lower.contains("verification failed") && !lower.contains("failed:"),
        "qemu-io {cmds:?} on {uri}:\n{out}"
    );
    out
}

fn quit(mut a: Appliance) -> String {
    a.qmp().cmd("quit", Value::Null).expect("quit");
    let status = a.wait_exit(Duration::from_secs(30)).expect("QEMU exits");
    let console = a.console();
    assert_eq!(status.code(), Some(0), "console:\n{console}");
    console
}

fn qmp_error(a: &mut Appliance, name: &str, args: Value) -> String {
    let r = a.qmp().execute(name, args).expect("QMP reply");
    r["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("{name} should fail: {r}"))
        .to_string()
}

// ---- A minimal raw NBD client, for held connections and bad clients ----

const NBD_OPT_GO: u32 = 7;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

struct Raw {
    s: TcpStream,
}

impl Raw {
    /// Connects and reads the greeting.
    fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_nodelay(true).unwrap();
        let mut r = Raw { s };
        let g = r.read(18);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        r
    }

    fn read(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.s.read_exact(&mut b).expect("read from server");
        b
    }

    /// Fixed newstyle, no zeroes, then `NBD_OPT_GO` for `name`: returns
    /// the export size, or the error reply's type.
    fn go(&mut self, name: &str) -> Result<u64, u32> {
        let mut m = 3u32.to_be_bytes().to_vec();
        m.extend_from_slice(b"IHAVEOPT");
        m.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        m.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        m.extend_from_slice(&(name.len() as u32).to_be_bytes());
        m.extend_from_slice(name.as_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        self.s.write_all(&m).unwrap();
        let mut size = 0;
        loop {
            let h = self.read(20);
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let data = self.read(len);
            match kind {
                1 => return Ok(size),
                3 if u16::from_be_bytes([data[0], data[1]]) == 0 => {
                    size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                }
                3 => {}
                k if k & 0x8000_0000 != 0 => return Err(k),
                _ => {}
            }
        }
    }

    fn request(&mut self, kind: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.s.write_all(&m).unwrap();
    }

    /// A simple reply: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        let h = self.read(16);
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.request(1, cookie, offset, data.len() as u32, data);
        assert_eq!(self.reply(), (0, cookie));
    }

    fn read_at(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, cookie, offset, len, &[]);
        assert_eq!(self.reply(), (0, cookie));
        self.read(len as usize)
    }

    /// Whether the server has closed the connection (EOF within `timeout`).
    fn closed_within(&mut self, timeout: Duration) -> bool {
        self.s.set_read_timeout(Some(timeout)).unwrap();
        let mut b = [0u8; 4096];
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.s.read(&mut b) {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
        false
    }
}

/// A raw image with the host's pattern 0x11 over its first 8 MiB.
fn image(dir: &Path, name: &str, size: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    create(&p, size);
    qemu_io(&p, &["write -P 0x11 0 8M".into()]);
    p
}

#[test]
fn writes_acknowledged_over_nbd_are_on_the_disk_after_quit() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "disk.img", 64 * MIB);
    let append = format!(
        "--blockdev driver=virtio-blk,node-name=vblk,serial=disk0 {NBD_SERVER} \
         --export type=nbd,id=e0,node-name=vblk,name=disk,writable=on,description=the-disk"
    );
    let (a, port) = boot(&append, vec![img.clone()]);
    let u = uri(port, "disk");

    // What the client is told about the export.
    let info = client(&a, Command::new("nbdinfo").args(["--json", &u]));
    let v: Value = serde_json::from_str(&info).expect("nbdinfo JSON");
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "disk");
    assert_eq!(e["description"], "the-disk");
    assert_eq!(e["export-size"], 64 * MIB);
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["can_flush"], true);
    assert_eq!(e["can_fua"], true);
    for cap in ["flush", "fua", "trim", "zero"] {
        client(&a, Command::new("nbdinfo").args(["--can", cap, &u]));
    }

    // The host's pattern reads back; writes, FUA writes, zeroes, flush.
    qemu_io_nbd(
        &a,
        &u,
        &[
            "read -P 0x11 0 8M",
            "write -P 0xa5 1M 2M",
            "write -f -P 0x5a 4M 64k",
            "write -z 6M 1M",
            "write -P 0x3c 9M 3M",
            "flush",
            "read -P 0xa5 1M 2M",
            "read -P 0x5a 4M 64k",
            "read -P 0 6M 1M",
        ],
    );
    // A whole-disk copy out with nbdcopy (parallel requests).
    let out = dir.path().join("out.img");
    client(&a, Command::new("nbdcopy").arg(&u).arg(&out));
    qemu_io(
        &out,
        &[
            "read -P 0x11 0 1M".into(),
            "read -P 0xa5 1M 2M".into(),
            "read -P 0x5a 4M 64k".into(),
            "read -P 0 6M 1M".into(),
            "read -P 0x3c 9M 3M".into(),
        ],
    );
    // Data round trip: host file → export → compare.
    qemu_io(
        &out,
        &["write -P 0x77 16M 8M".into(), "write -P 0x88 40M 1M".into()],
    );
    client(&a, Command::new("nbdcopy").arg("--flush").arg(&out).arg(&u));
    client(
        &a,
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&out)
            .arg(&u),
    );

    // A client still connected at quit: the export goes first (event), the
    // client is told the server is shutting down.
    let mut held = Raw::connect(port);
    assert_eq!(held.go("disk"), Ok(64 * MIB));
    held.write(1, 32 * MIB, &[0xee; 4096]);
    let console = quit(a);
    assert!(
        console.contains("NBD export 'e0' closed"),
        "the export closes first at quit:\n{console}"
    );
    assert!(
        held.closed_within(Duration::from_secs(5)),
        "the held client is disconnected"
    );

    // Everything acknowledged is on the host image.
    qemu_io(
        &img,
        &[
            "read -P 0x11 0 1M".into(),
            "read -P 0xa5 1M 2M".into(),
            "read -P 0x5a 4M 64k".into(),
            "read -P 0 6M 1M".into(),
            "read -P 0x3c 9M 3M".into(),
            "read -P 0x77 16M 8M".into(),
            "read -P 0xee 32M 4k".into(),
            "read -P 0x88 40M 1M".into(),
        ],
    );
}

#[test]
fn qmp_exports_lifecycle_errors_and_resize_refusal() {
    let (mut a, port) = boot(
        "--blockdev driver=null-co,node-name=n0,size=16777216,read-zeroes=on \
         --blockdev driver=null-co,node-name=n1,size=8388608,read-zeroes=on",
        Vec::new(),
    );
    // No server yet.
    assert_eq!(
        qmp_error(
            &mut a,
            "block-export-add",
            json!({"type": "nbd", "id": "e1", "node-name": "n0"})
        ),
        "NBD server not running"
    );
    assert_eq!(
        qmp_error(&mut a, "nbd-server-stop", Value::Null),
        "NBD server not running"
    );
    // QMP's legacy address shape (`data`), as QEMU 7.2 takes it.
    a.qmp()
        .cmd(
            "nbd-server-start",
            json!({"addr": {"type": "inet", "data": {"host": "0.0.0.0", "port": "10809"}}}),
        )
        .unwrap();
    assert_eq!(
        qmp_error(
            &mut a,
            "nbd-server-start",
            json!({"addr": {"type": "inet", "host": "0.0.0.0", "port": "10809"}})
        ),
        "NBD server already running"
    );
    a.qmp()
        .cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e1", "node-name": "n0", "name": "zero",
                   "description": "sixteen MiB of zeroes"}),
        )
        .unwrap();
    assert_eq!(
        a.qmp().cmd("query-block-exports", Value::Null).unwrap(),
        json!([{"type": "nbd", "id": "e1", "node-name": "n0", "shutting-down": false, "x-clients": 0}])
    );
    assert_eq!(
        qmp_error(
            &mut a,
            "block-export-add",
            json!({"type": "nbd", "id": "e1", "node-name": "n1"})
        ),
        "Block export id 'e1' is already in use"
    );
    assert_eq!(
        qmp_error(
            &mut a,
            "block-export-add",
            json!({"type": "nbd", "id": "e2", "node-name": "n1", "name": "zero"})
        ),
        "NBD server already has export named 'zero'"
    );
    assert_eq!(
        qmp_error(
            &mut a,
            "block-export-add",
            json!({"type": "nbd", "id": "e2", "node-name": "nope"})
        ),
        "Cannot find device='' nor node-name='nope'"
    );
    // The name defaults to the node name.
    a.qmp()
        .cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e2", "node-name": "n1", "writable": true}),
        )
        .unwrap();

    // Clients see both, with the truth about each.
    let list = client(
        &a,
        Command::new("nbdinfo").args(["--list", "--json", &uri(port, "")]),
    );
    let v: Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["zero", "n1"]);
    let zero = &v["exports"][0];
    assert_eq!(zero["description"], "sixteen MiB of zeroes");
    assert_eq!(zero["is_read_only"], true);
    assert_eq!(zero["export-size"], 16 * MIB);
    client(
        &a,
        Command::new("qemu-io")
            .args(["-r", "-f", "raw", "-c", "read -P 0 0 16M"])
            .arg(uri(port, "zero")),
    );
    // qemu-io refuses to open a read-only export for writing; a raw
    // client's write gets EPERM.
    let o = output(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 4k"])
            .arg(uri(port, "zero")),
    );
    assert!(!o.status.success() || text(&o).contains("Permission denied"));
    let mut ro = Raw::connect(port);
    ro.go("zero").unwrap();
    ro.request(1, 7, 0, 512, &[1; 512]);
    assert_eq!(ro.reply(), (1, 7), "EPERM");

    // An exported node does not share RESIZE.
    assert_eq!(
        qmp_error(
            &mut a,
            "block_resize",
            json!({"node-name": "n1", "size": 1 << 24})
        ),
        "Permission conflict on node 'n1': permissions 'resize' are both required by an \
         unnamed block device (uses node 'n1' as 'root' child) and unshared by an unnamed \
         block device (uses node 'n1' as 'root' child)."
    );

    // Safe mode refuses while a client is connected; hard mode disconnects it.
    let mut held = Raw::connect(port);
    assert_eq!(held.go("n1"), Ok(8 * MIB));
    held.write(1, 0, &[0x42; 512]);
    assert_eq!(
        qmp_error(&mut a, "block-export-del", json!({"id": "e2"})),
        "export 'e2' still in use"
    );
    assert_eq!(
        qmp_error(&mut a, "block-export-del", json!({"id": "nope"})),
        "Export 'nope' is not found"
    );
    a.qmp()
        .cmd("block-export-del", json!({"id": "e2", "mode": "hard"}))
        .unwrap();
    let ev = a
        .qmp()
        .wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(20))
        .unwrap();
    assert_eq!(ev["data"]["id"], "e2");
    assert!(
        held.closed_within(Duration::from_secs(20)),
        "the held client must be disconnected"
    );
    assert_eq!(
        a.qmp().cmd("query-block-exports", Value::Null).unwrap(),
        json!([{"type": "nbd", "id": "e1", "node-name": "n0", "shutting-down": false, "x-clients": 1}]),
        "`ro` is still connected to e1"
    );
    // The export is gone for new clients; RESIZE is no longer held back
    // (null-co itself cannot resize).
    let mut late = Raw::connect(port);
    assert!(
        late.go("n1").is_err(),
        "a deleted export must not be served"
    );
    assert_eq!(
        qmp_error(
            &mut a,
            "block_resize",
            json!({"node-name": "n1", "size": 1 << 24})
        ),
        "Image format driver does not support resize"
    );

    // Safe delete once its clients have gone (the server notices a closed
    // connection on its next poll); then the legacy pair.
    drop(ro);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = a
            .qmp()
            .execute("block-export-del", json!({"id": "e1"}))
            .unwrap();
        if r.get("return").is_some() {
            break;
        }
        assert_eq!(r["error"]["desc"], "export 'e1' still in use");
        assert!(Instant::now() < deadline, "clients of e1 never went away");
        thread::sleep(Duration::from_millis(50));
    }
    a.qmp()
        .wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(20))
        .unwrap();
    a.qmp()
        .cmd("nbd-server-add", json!({"device": "n0", "writable": true}))
        .unwrap();
    qemu_io_nbd(&a, &uri(port, "n0"), &["write -P 0x12 0 64k", "flush"]);
    // qemu-io has gone, but the server may not have noticed yet: the
    // client count is left out.
    let mut exports = a.qmp().cmd("query-block-exports", Value::Null).unwrap();
    exports[0].as_object_mut().unwrap().remove("x-clients");
    assert_eq!(
        exports,
        json!([{"type": "nbd", "id": "n0", "node-name": "n0", "shutting-down": false}])
    );
    a.qmp()
        .cmd("nbd-server-remove", json!({"name": "n0"}))
        .unwrap();
    a.qmp()
        .wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(20))
        .unwrap();

    // Stopping the server closes its exports.
    a.qmp()
        .cmd(
            "block-export-add",
            json!({"type": "nbd", "id": "e3", "node-name": "n0"}),
        )
        .unwrap();
    a.qmp().cmd("nbd-server-stop", Value::Null).unwrap();
    let ev = a
        .qmp()
        .wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(20))
        .unwrap();
    assert_eq!(ev["data"]["id"], "e3");
    assert_eq!(
        a.qmp().cmd("query-block-exports", Value::Null).unwrap(),
        json!([])
    );
    let console = quit(a);
    assert!(
        console.contains("all 2 nodes closed"),
        "close-all:\n{console}"
    );
}

#[test]
fn bad_clients_do_not_harm_other_connections() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "disk.img", 64 * MIB);
    let (a, port) = boot(
        &format!(
            "--blockdev driver=virtio-blk,node-name=vblk,serial=disk0 \
             {NBD_SERVER},max-connections=16 \
             --export type=nbd,id=e0,node-name=vblk,name=disk,writable=on"
        ),
        vec![img.clone()],
    );
    // A client that connects and says nothing: dropped after 10 s.
    let mut silent = Raw::connect(port);
    let silent_since = Instant::now();
    let mut good = Raw::connect(port);
    assert_eq!(good.go("disk"), Ok(64 * MIB));
    good.write(1, 0, &[0x5a; 4096]);

    // Garbage instead of a handshake: the server hangs up.
    let mut junk = Raw::connect(port);
    junk.s.write_all(&[0xff; 64]).unwrap();
    assert!(junk.closed_within(Duration::from_secs(20)));

    // A bad request magic after the handshake: hard disconnect.
    let mut bad = Raw::connect(port);
    bad.go("disk").unwrap();
    bad.s.write_all(&[0xde; 28]).unwrap();
    assert!(bad.closed_within(Duration::from_secs(20)));

    // An unknown export.
    let mut lost = Raw::connect(port);
    assert!(lost.go("nope").is_err());

    // A client that vanishes mid-write (header and half the payload) and
    // one that vanishes with writes in flight.
    let mut half = Raw::connect(port);
    half.go("disk").unwrap();
    let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&[0, 0, 0, 1]);
    m.extend_from_slice(&9u64.to_be_bytes());
    m.extend_from_slice(&(MIB).to_be_bytes());
    m.extend_from_slice(&(1u32 << 20).to_be_bytes());
    m.extend_from_slice(&[0x99; 512 * 1024]);
    half.s.write_all(&m).unwrap();
    drop(half);
    let mut burst = Raw::connect(port);
    burst.go("disk").unwrap();
    for i in 0..16u64 {
        burst.request(1, i, 8 * MIB + i * 65536, 65536, &[0x44; 65536]);
    }
    burst.s.shutdown(Shutdown::Both).unwrap();
    drop(burst);

    // Another one asking for 2 GiB of reads (64 × 32 MiB, 8 times the
    // appliance's RAM) without reading the replies, then killed. Replies
    // a client has not taken count against its share of read memory, so
    // the appliance holds one of them, not the heap's worth.
    let mut deaf = Raw::connect(port);
    deaf.go("disk").unwrap();
    for i in 0..64u64 {
        deaf.request(0, i, (i % 2) * 32 * MIB, 32 << 20, &[]);
    }
    thread::sleep(Duration::from_secs(2));
    let console = a.console();
    assert!(!console.contains("PANIC"), "{console}");
    drop(deaf);

    // The good connection carries on.
    assert_eq!(good.read_at(2, 0, 4096), vec![0x5a; 4096]);
    good.write(3, 4096, &[0x6b; 4096]);
    assert_eq!(good.read_at(4, 4096, 4096), vec![0x6b; 4096]);

    // Eight clients at once, each on its own region: connected one after
    // another (see `QemuIoSession`), then each sends its commands.
    let mut workers: Vec<_> = (0..8u64)
        .map(|_| QemuIoSession::open(&["-f", "raw"], &uri(port, "disk"), 120))
        .collect();
    for (i, w) in (0..8u64).zip(&mut workers) {
        let pat = format!("0x{:02x}", 0x20 + i);
        let off = 16 * MIB + i * 4 * MIB;
        w.send(&[
            format!("write -P {pat} {off} 4M"),
            format!("read -P {pat} {off} 4M"),
        ]);
    }
    for w in workers {
        let (ok, out) = w.finish();
        assert!(
            ok && !out.contains("failed"),
            "parallel client: {out}\nconsole:\n{}",
            a.console()
        );
    }
    qemu_io_nbd(
        &a,
        &uri(port, "disk"),
        &["read -P 0x5a 0 4k", "read -P 0x6b 4k 4k", "flush"],
    );
    assert!(
        silent.closed_within(Duration::from_secs(30)),
        "a silent client must be dropped"
    );
    let waited = silent_since.elapsed();
    assert!(
        waited >= Duration::from_secs(9),
        "dropped too early: {waited:?}"
    );
    drop(good);
    let console = quit(a);
    // Nothing the bad clients made it allocate is left: the heap holds the
    // listening sockets' buffers (16 MiB), not hundreds of MiB.
    let used_kib: u64 = console
        .lines()
        .find_map(|l| l.strip_prefix("heap: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no heap line in the halt report:\n{console}"));
    assert!(
        used_kib < 40 * 1024,
        "heap still holds {used_kib} KiB:\n{console}"
    );
    // The half-sent write never landed.
    let mut checks: Vec<String> = vec![
        "read -P 0x5a 0 4k".into(),
        "read -P 0x6b 4k 4k".into(),
        "read -P 0x11 1M 1M".into(),
    ];
    for i in 0..8u64 {
        checks.push(format!(
            "read -P 0x{:02x} {} 4M",
            0x20 + i,
            16 * MIB + i * 4 * MIB
        ));
    }
    qemu_io(&img, &checks);
}

/// QEMU iotest 140: ejecting a named backend under a legacy
/// `nbd-server-add` export deletes the export; new clients are told
/// "export 'drv' not present". The named backend is a `--drive`.
#[test]
fn eject_under_legacy_export_deletes_it() {
    let (mut a, port) = boot(
        &format!(
            "--blockdev driver=null-co,node-name=n0,read-zeroes=on --drive id=drv,node-name=n0 {NBD_SERVER}"
        ),
        Vec::new(),
    );
    a.qmp()
        .cmd("nbd-server-add", json!({"device": "drv"}))
        .unwrap();
    // The legacy export is read-only by default: open it so.
    client(
        &a,
        Command::new("qemu-io")
            .args(["-r", "-f", "raw", "-c", "read -P 0 0 64k"])
            .arg(uri(port, "drv")),
    );
    a.qmp().cmd("eject", json!({"device": "drv"})).unwrap();
    let ev = a
        .qmp()
        .wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(20))
        .unwrap();
    assert_eq!(ev["data"]["id"], "drv");
    let o = output(
        Command::new("qemu-io")
            .args(["-r", "-f", "raw", "-c", "read 0 512"])
            .arg(uri(port, "drv")),
    );
    assert!(
        text(&o).contains("export 'drv' not present"),
        "{}",
        text(&o)
    );
    quit(a);
}

/// The appliance on a tap in a network namespace, exporting a 64 MiB
/// `null-co` node as `disk` (`export_opts` appended to the export);
/// `None`, with a note, where no namespace can be made (needs root).
fn boot_on_tap(export_opts: &str) -> Option<(harness::qemu::NetnsTap, Appliance)> {
    let tap = match harness::qemu::NetnsTap::create() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("skipped: no network namespace with a tap here: {e}");
            return None;
        }
    };
    let cfg = QemuConfig {
        append: format!(
            "{} --blockdev driver=null-co,node-name=n0,size=67108864,read-zeroes=on \
             {NBD_SERVER} --export type=nbd,id=e0,node-name=n0,name=disk{export_opts}",
            harness::qemu::NetnsTap::GUEST_IP_SETTING
        ),
        netns_tap: Some(tap.clone()),
        ..QemuConfig::default()
    };
    let a = Appliance::boot(&cfg);
    Some((tap, a))
}

/// The fast path: a tap device in a network namespace (needs root; skipped
/// with a note otherwise). The guest announces itself with a gratuitous
/// ARP, answers ping, and serves NBD to clients in the namespace.
#[test]
fn tap_in_a_netns_gratuitous_arp_ping_and_nbd() {
    let Some((tap, a)) = boot_on_tap(",writable=on") else {
        return;
    };
    let guest = harness::qemu::NetnsTap::GUEST_IP;
    // The namespace learns the guest's MAC without asking.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = output(tap.exec("ip").args(["neigh", "show", guest]));
        if text(&o).contains("52:54:00:12:34:56") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no neighbour entry from the gratuitous ARP: {}",
            text(&o)
        );
        thread::sleep(Duration::from_millis(50));
    }
    // ICMP echo (no ping binary needed: a raw socket in Python).
    let echo = format!(
        "import socket,struct,sys\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_ICMP)\n\
         s.settimeout(5)\n\
         def ck(b):\n\
         \x20b+=b'\\0'*(len(b)%2)\n\
         \x20t=sum(struct.unpack('!%dH'%(len(b)//2),b))\n\
         \x20t=(t>>16)+(t&0xffff);t+=t>>16\n\
         \x20return ~t&0xffff\n\
         for seq in range(3):\n\
         \x20p=struct.pack('!BBHHH',8,0,0,0x4242,seq)+b'blockhaus'\n\
         \x20p=p[:2]+struct.pack('!H',ck(p))+p[4:]\n\
         \x20s.sendto(p,('{guest}',0))\n\
         \x20while True:\n\
         \x20\x20d,a=s.recvfrom(2048)\n\
         \x20\x20h=(d[0]&15)*4\n\
         \x20\x20if a[0]=='{guest}' and d[h]==0 and d[h+6:h+8]==struct.pack('!H',seq): break\n\
         print('3 echo replies')\n"
    );
    let out = client(&a, tap.exec("/usr/bin/python3").args(["-c", &echo]));
    assert!(out.contains("3 echo replies"), "{out}");
    let u = format!("nbd://{guest}/disk");
    client(&a, tap.exec("nbdinfo").arg(&u));
    client(
        &a,
        tap.exec("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 0 8M",
                "-c",
                "read -P 0 0 8M",
            ])
            .arg(&u),
    );
    client(&a, tap.exec("nbdcopy").arg(&u).arg("null:"));
    quit(a);
}

/// Data ranges `(start, end)` of `nbdinfo --map` output, merged.
fn data_ranges_of_map(map: &str) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for line in map.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let (Ok(start), Ok(len), Ok(kind)) = (
            f[0].parse::<u64>(),
            f[1].parse::<u64>(),
            f[2].parse::<u32>(),
        ) else {
            continue;
        };
        if kind & 1 == 0 {
            match out.last_mut() {
                Some(last) if last.1 == start => last.1 = start + len,
                _ => out.push((start, start + len)),
            }
        }
    }
    out
}

#[test]
fn qcow2_export_block_status_matches_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    client_host(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("64M"),
    );
    client_host(
        Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 0x61 0 1M",
                "-c",
                "write -P 0x62 8M 3M",
            ])
            .args(["-c", "write -P 0x63 40M 64k"])
            .arg(&img),
    );
    let (a, port) = boot(
        &format!(
            "--blockdev driver=virtio-blk,node-name=vblk,serial=disk0 \
             --blockdev driver=qcow2,node-name=q,file=vblk {NBD_SERVER} \
             --export type=nbd,id=e0,node-name=q,name=disk"
        ),
        vec![img.clone()],
    );
    let u = uri(port, "disk");
    let map = client(&a, Command::new("nbdinfo").args(["--map", &u]));
    assert_eq!(
        data_ranges_of_map(&map),
        [(0, MIB), (8 * MIB, 11 * MIB), (40 * MIB, 40 * MIB + 65536)],
        "nbdinfo --map:\n{map}"
    );
    client(
        &a,
        Command::new("qemu-img")
            .args(["compare", "-U", "-f", "qcow2", "-F", "raw"])
            .arg(&img)
            .arg(&u),
    );
    quit(a);
}

fn client_host(cmd: &mut Command) {
    let o = output(cmd);
    assert!(o.status.success(), "{cmd:?}: {}", text(&o));
}

#[test]
fn max_connections_makes_further_clients_wait() {
    let (a, port) = boot(
        &format!(
            "--blockdev driver=null-co,node-name=n0,size=1048576,read-zeroes=on \
             {NBD_SERVER},max-connections=1 --export type=nbd,id=e0,node-name=n0,name=disk"
        ),
        Vec::new(),
    );
    let mut first = Raw::connect(port);
    assert_eq!(first.go("disk"), Ok(MIB));
    // The second client is accepted by TCP but served only when the first
    // has gone (QEMU stops accepting at max-connections).
    let mut second = TcpStream::connect(("127.0.0.1", port)).unwrap();
    second
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut greeting = [0u8; 18];
    assert!(
        second.read_exact(&mut greeting).is_err(),
        "served beyond max-connections"
    );
    drop(first);
    second
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    second
        .read_exact(&mut greeting)
        .expect("greeting once a slot is free");
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    drop(second);
    // With one connection allowed, multi-conn is not offered (as QEMU).
    let info = client(
        &a,
        Command::new("nbdinfo").args(["--json", &uri(port, "disk")]),
    );
    let v: Value = serde_json::from_str(&info).expect("nbdinfo JSON");
    assert_eq!(v["exports"][0]["can_multi_conn"], false, "{info}");
    quit(a);
}

#[test]
fn a_scsi_hd_disk_exported_keeps_acknowledged_writes() {
    let imgs = harness::host::images();
    let mut cfg = harness::host::config(&imgs);
    let port = free_port();
    cfg.nbd_port = Some(port);
    cfg.append = format!(
        "--blockdev driver=virtio-scsi,node-name=sd0,serial=scsi0 {NBD_SERVER} \
         --export type=nbd,id=e0,node-name=sd0,name=scsi,writable=on"
    );
    let a = Appliance::boot(&cfg);
    let u = uri(port, "scsi");
    qemu_io_nbd(
        &a,
        &u,
        &[
            "read -P 0x22 0 24M",
            "write -P 0xb7 30M 2M",
            "write -f -P 0xb8 33M 64k",
            "discard 40M 1M",
            "flush",
        ],
    );
    client(&a, Command::new("nbdinfo").args(["--can", "trim", &u]));
    quit(a);
    qemu_io(
        &imgs.scsi_direct,
        &[
            "read -P 0x22 0 24M".into(),
            "read -P 0xb7 30M 2M".into(),
            "read -P 0xb8 33M 64k".into(),
        ],
    );
}

/// `quit` while a client has writes in flight: the export closes first,
/// requests in flight finish, and every write the client saw acknowledged
/// is on the host image afterwards.
#[test]
fn quit_with_writes_in_flight_keeps_every_acknowledged_one() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "disk.img", 64 * MIB);
    let append = format!(
        "--blockdev driver=virtio-blk,node-name=vblk,serial=disk0 {NBD_SERVER} \
         --export type=nbd,id=e0,node-name=vblk,name=disk,writable=on"
    );
    let (mut a, port) = boot(&append, vec![img.clone()]);
    let mut c = Raw::connect(port);
    c.go("disk").unwrap();
    const N: u64 = 48;
    let chunk = 256 * 1024u64;
    let reader = {
        let mut r = Raw {
            s: c.s.try_clone().unwrap(),
        };
        thread::spawn(move || {
            let mut acked = Vec::new();
            let mut h = [0u8; 16];
            while r.s.read_exact(&mut h).is_ok() {
                let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
                let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
                if err == 0 {
                    acked.push(cookie);
                }
            }
            acked
        })
    };
    for i in 0..N {
        // FUA writes, each with its own pattern, at 16 MiB + i * 256 KiB.
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_FLAG_FUA
        m.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
        m.extend_from_slice(&i.to_be_bytes());
        m.extend_from_slice(&(16 * MIB + i * chunk).to_be_bytes());
        m.extend_from_slice(&(chunk as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(0x80 + i as u8, chunk as usize));
        if c.s.write_all(&m).is_err() {
            break;
        }
        if i == N / 2 {
            a.qmp().send_raw(b"{\"execute\": \"quit\"}\n").unwrap();
        }
    }
    let status = a.wait_exit(Duration::from_secs(60)).expect("QEMU exits");
    let console = a.console();
    assert_eq!(status.code(), Some(0), "console:\n{console}");
    let acked = reader.join().unwrap();
    assert!(!acked.is_empty(), "no write was acknowledged before quit");
    let checks: Vec<String> = acked
        .iter()
        .map(|&i| {
            format!(
                "read -P 0x{:02x} {} {chunk}",
                0x80 + i as u8,
                16 * MIB + i * chunk
            )
        })
        .collect();
    qemu_io(&img, &checks);
    eprintln!("{} of {N} writes acknowledged before the halt", acked.len());
}

/// The halt path closes the exports first: the QMP client sees `SHUTDOWN`,
/// then `BLOCK_EXPORT_DELETED` for every export, before QEMU exits.
#[test]
fn quit_closes_exports_first_and_reports_each() {
    let append = format!(
        "--blockdev driver=null-co,node-name=n0 --blockdev driver=null-co,node-name=n1 {NBD_SERVER} \
         --export type=nbd,id=e0,node-name=n0,name=a --export type=nbd,id=e1,node-name=n1,name=b"
    );
    let (mut a, _port) = boot(&append, Vec::new());
    a.qmp().cmd("quit", Value::Null).unwrap();
    let shutdown = a
        .qmp()
        .wait_event("SHUTDOWN", Duration::from_secs(20))
        .unwrap();
    assert_eq!(shutdown["data"]["reason"], "host-qmp-quit");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let ev = a
            .qmp()
            .wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(20))
            .unwrap();
        ids.push(ev["data"]["id"].as_str().unwrap().to_string());
    }
    ids.sort();
    assert_eq!(ids, ["e0", "e1"]);
    let status = a.wait_exit(Duration::from_secs(30)).expect("QEMU exits");
    let console = a.console();
    assert_eq!(status.code(), Some(0), "{console}");
    // The halt report names them, after the block layer's close-all.
    let report = &console[console
        .find("=== halt sequence done ===")
        .expect("halt report")..];
    assert!(
        report
            .lines()
            .any(|l| l.trim_end() == "exports closed: e0, e1"),
        "{console}"
    );
    assert!(
        console.find("=== block layer closed ===") < console.find("=== halt sequence done ===")
    );
}

/// Sixteen clients connect at the same instant, right after boot, while
/// the server has at most eight sockets listening (smoltcp has no accept
/// queue): every one is served. A connection request that finds no free
/// socket is dropped, not reset, so its client tries again, as with a
/// kernel's full accept queue. On a tap in a network namespace (needs
/// root; skipped otherwise): QEMU's user network accepts host connections
/// one at a time (its listen backlog is 1), which would both spread the
/// burst out and, when the host's accept queue overflows, leave a client
/// waiting forever on a connection slirp never saw.
#[test]
fn a_burst_of_clients_beyond_the_backlog_is_served() {
    let Some((tap, a)) = boot_on_tap("") else {
        return;
    };
    let u = format!("nbd://{}/disk", harness::qemu::NetnsTap::GUEST_IP);
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let mut cmd = tap.exec("timeout");
            cmd.args(["60", "qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 64k"])
                .arg(&u);
            thread::spawn(move || output(&mut cmd))
        })
        .collect();
    for c in clients {
        let o = c.join().unwrap();
        assert!(
            o.status.success() && !text(&o).contains("failed"),
            "{}\nconsole:\n{}",
            text(&o),
            a.console()
        );
    }
    quit(a);
}
