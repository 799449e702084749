//! Disks with 4 KiB logical sectors (issue 11): virtio-blk and scsi-hd
//! with `logical_block_size=4096`, real images made by `qemu-img`, real
//! NBD clients (libnbd's Python binding, nbdinfo, qemu-io), the halt path,
//! and the bytes on the host image afterwards.
//!
//! A write that is not aligned to 4 KiB is a read-modify-write of the
//! covering blocks inside the appliance; before the fix, eight clients
//! writing their own 512-byte piece of the same blocks lost most pieces.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Command;

use harness::host::{MIB, QemuIoSession, create, qemu_io};
use harness::qemu::free_port;
use harness::{Appliance, QemuConfig};
use serde_json::Value;

const NBD: &str = "--nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809";

#[derive(Clone, Copy, Debug)]
enum Transport {
    VirtioBlk,
    ScsiHd,
}

impl Transport {
    fn driver(self) -> &'static str {
        match self {
            Transport::VirtioBlk => "virtio-blk",
            Transport::ScsiHd => "virtio-scsi",
        }
    }
}

/// QEMU's arguments for `disks` (image, serial) with 4 KiB sectors.
fn disk_args(transport: Transport, disks: &[(&Path, &str)]) -> Vec<String> {
    let mut args = Vec::new();
    if let Transport::ScsiHd = transport {
        args.extend(["-device".into(), "virtio-scsi-pci,id=scsi0".into()]);
    }
    for (i, (path, serial)) in disks.iter().enumerate() {
        args.push("-drive".into());
        args.push(format!(
            "file={},if=none,id=d{i},format=raw,discard=unmap",
            path.display()
        ));
        args.push("-device".into());
        let sectors = "logical_block_size=4096,physical_block_size=4096";
        args.push(match transport {
            Transport::VirtioBlk => format!("virtio-blk-pci,drive=d{i},serial={serial},{sectors}"),
            Transport::ScsiHd => {
                format!(
                    "scsi-hd,bus=scsi0.0,drive=d{i},scsi-id={i},lun=0,serial={serial},{sectors}"
                )
            }
        });
    }
    args
}

fn boot(transport: Transport, disks: &[(&Path, &str)], append: &str) -> (Appliance, u16) {
    let port = free_port();
    let cfg = QemuConfig {
        append: append.into(),
        nbd_port: Some(port),
        extra: disk_args(transport, disks)
            .into_iter()
            .map(Into::into)
            .collect(),
        ..QemuConfig::default()
    };
    (Appliance::boot(&cfg), port)
}

fn uri(port: u16, name: &str) -> String {
    format!("nbd://127.0.0.1:{port}/{name}")
}

fn run(a: &Appliance, cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success(),
        "{cmd:?} failed:\n{text}\nconsole:\n{}",
        a.console()
    );
    text
}

fn qemu_io_nbd(a: &Appliance, uri: &str, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = run(a, cmd.arg(uri));
    let lower = out.to_lowercase();
    assert!(
        !lower.contains("verification failed") && !lower.contains("failed"),
        "qemu-io {cmds:?} on {uri}:\n{out}"
    );
}

fn nbdinfo(a: &Appliance, uri: &str) -> Value {
    let out = run(a, Command::new("nbdinfo").args(["--json", uri]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo JSON: {e}\n{out}"))
}

fn device<'a>(list: &'a Value, serial: &str) -> &'a Value {
    list.as_array()
        .expect("x-query-devices returns a list")
        .iter()
        .find(|d| d["serial"] == serial)
        .unwrap_or_else(|| panic!("no disk {serial} in {list}"))
}

/// One client's 512-byte piece of every block: its own byte per block.
fn piece_byte(client: u64, block: u64) -> u8 {
    ((client * 37 + block) % 255 + 1) as u8
}

const BLOCKS: u64 = 256;
const CLIENTS: u64 = 8;

/// A libnbd client that does not ask for block sizes (so the server tells
/// it 1 and it may write 512 bytes at a time, as QEMU allows), says it is
/// connected, waits for a line on stdin, writes its piece of every block
/// with all writes in flight at once, checks every one was acknowledged,
/// then flushes.
const WRITER: &str = r#"
import nbd, sys
client, uri, blocks = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
h = nbd.NBD()
h.set_request_block_size(False)
h.connect_uri(uri)
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1, h.get_block_size(nbd.SIZE_MINIMUM)
print("connected", flush=True)
sys.stdin.readline()
cookies = []
for b in range(blocks):
    byte = (client * 37 + b) % 255 + 1
    cookies.append(h.aio_pwrite(bytes([byte]) * 512, b * 4096 + client * 512))
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c), c
h.flush()
h.shutdown()
"#;

fn concurrent_pieces(transport: Transport) {
    let dir = tempdir("pieces");
    let img = dir.path().join("shared.img");
    create(&img, BLOCKS * 4096);
    let append = format!(
        "--blockdev driver={},node-name=d0,serial=d4k {NBD} --export type=nbd,id=e0,node-name=d0,name=disk,writable=on",
        transport.driver()
    );
    let (a, port) = boot(transport, &[(&img, "d4k")], &append);
    let u = uri(port, "disk");
    // Connected one after another (see `QemuIoSession`), then all let go
    // at once.
    let mut writers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let mut w = Command::new("timeout")
                .args(["120", "/usr/bin/python3", "-c", WRITER])
                .args([&c.to_string(), &u, &BLOCKS.to_string()])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("python3 with libnbd");
            let mut line = String::new();
            let _ = BufReader::new(w.stdout.as_mut().unwrap()).read_line(&mut line);
            if line.trim() != "connected" {
                let o = w.wait_with_output().expect("writer");
                panic!(
                    "writer {c} did not connect: {line}{}\nconsole:\n{}",
                    String::from_utf8_lossy(&o.stderr),
                    a.console()
                );
            }
            w
        })
        .collect();
    for w in &mut writers {
        writeln!(w.stdin.as_mut().unwrap(), "go").expect("writer stdin");
    }
    for w in writers {
        let o = w.wait_with_output().expect("writer");
        assert!(
            o.status.success(),
            "writer failed: {}\nconsole:\n{}",
            String::from_utf8_lossy(&o.stderr),
            a.console()
        );
    }
    a.quit();
    assert_no_piece_lost(&img);
}

/// Every client's piece of every block is on the host image.
fn assert_no_piece_lost(img: &Path) {
    let data = std::fs::read(img).expect("image");
    let mut lost = Vec::new();
    for block in 0..BLOCKS {
        for client in 0..CLIENTS {
            let o = (block * 4096 + client * 512) as usize;
            if !data[o..o + 512]
                .iter()
                .all(|&b| b == piece_byte(client, block))
            {
                lost.push((block, client));
            }
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged pieces lost, first: {:?}",
        lost.len(),
        BLOCKS * CLIENTS,
        &lost[..lost.len().min(8)]
    );
}

/// The issue's reproducer as written: eight qemu-io processes, each with
/// its piece of every block in flight at once (`aio_write`), then
/// `aio_flush`. qemu-io asks for block sizes and pads its requests to the
/// minimum it is told, so the minimum must stay 1 for them to send their
/// pieces as they are.
#[test]
fn eight_qemu_io_clients_writing_512_byte_pieces_of_shared_4k_blocks_lose_nothing() {
    let dir = tempdir("qemu-io");
    let img = dir.path().join("shared.img");
    create(&img, BLOCKS * 4096);
    let append = format!(
        "--blockdev driver=virtio-blk,node-name=d0,serial=d4k {NBD} --export type=nbd,id=e0,node-name=d0,name=disk,writable=on"
    );
    let (a, port) = boot(Transport::VirtioBlk, &[(&img, "d4k")], &append);
    let u = uri(port, "disk");
    // Connected one after another (see `QemuIoSession`), then each sends
    // its writes.
    let mut writers: Vec<_> = (0..CLIENTS)
        .map(|_| QemuIoSession::open(&["-f", "raw"], &u, 120))
        .collect();
    for (c, w) in (0..CLIENTS).zip(&mut writers) {
        let mut cmds: Vec<String> = (0..BLOCKS)
            .map(|b| {
                format!(
                    "aio_write -P {} {} 512",
                    piece_byte(c, b),
                    b * 4096 + c * 512
                )
            })
            .collect();
        cmds.push("aio_flush".into());
        w.send(&cmds);
    }
    for w in writers {
        let (ok, text) = w.finish();
        assert!(
            ok && !text.contains("failed"),
            "{text}\nconsole:\n{}",
            a.console()
        );
    }
    a.quit();
    assert_no_piece_lost(&img);
}

#[test]
fn eight_clients_writing_512_byte_pieces_of_shared_4k_blocks_lose_nothing_virtio_blk() {
    concurrent_pieces(Transport::VirtioBlk);
}

#[test]
fn eight_clients_writing_512_byte_pieces_of_shared_4k_blocks_lose_nothing_scsi_hd() {
    concurrent_pieces(Transport::ScsiHd);
}

/// A raw disk and a qcow2 image on 4K-sector disks, exported over NBD:
/// the device's alignment reaches nbdinfo, unaligned qemu-io writes land,
/// qcow2 allocates and checks clean, the halt path closes everything.
fn end_to_end(transport: Transport) {
    let dir = tempdir("e2e");
    let raw = dir.path().join("raw.img");
    create(&raw, 8 * MIB);
    let q = dir.path().join("image.qcow2");
    let o = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&q)
        .arg("16M")
        .output()
        .expect("qemu-img");
    assert!(o.status.success(), "{o:?}");
    // Room for the image to grow into (trailing space is free clusters).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&q)
        .and_then(|f| f.set_len(32 * MIB))
        .expect("truncate");
    let drv = transport.driver();
    let append = format!(
        "--blockdev driver={drv},node-name=d0,serial=raw4k \
         --blockdev driver={drv},node-name=q0,serial=qcow4k \
         --blockdev driver=qcow2,node-name=fmt,file=q0 {NBD} \
         --export type=nbd,id=e0,node-name=d0,name=raw,writable=on \
         --export type=nbd,id=e1,node-name=fmt,name=qcow2,writable=on"
    );
    let (mut a, port) = boot(transport, &[(&raw, "raw4k"), (&q, "qcow4k")], &append);

    let list = a.qmp().cmd("x-query-devices", Value::Null).unwrap();
    assert_eq!(device(&list, "raw4k")["block-size"], 4096, "{list}");
    assert_eq!(device(&list, "qcow4k")["block-size"], 4096, "{list}");

    // The device's alignment is the raw export's preferred block size; the
    // minimum is 1 (the appliance pads); qcow2 prefers QEMU's 4 KiB.
    let info = nbdinfo(&a, &uri(port, "raw"));
    let e = &info["exports"][0];
    assert_eq!(e["block_size_minimum"], 1, "{info}");
    assert_eq!(e["block_size_preferred"], 4096, "{info}");
    assert_eq!(e["block_size_maximum"], 32 * MIB, "{info}");
    let info = nbdinfo(&a, &uri(port, "qcow2"));
    assert_eq!(info["exports"][0]["block_size_minimum"], 1, "{info}");
    assert_eq!(info["exports"][0]["block_size_preferred"], 4096, "{info}");

    // Unaligned writes through both exports, padded inside the appliance.
    qemu_io_nbd(
        &a,
        &uri(port, "raw"),
        &[
            "write -P 0x5a 512 1024",
            "write -P 0x6b 8192 4096",
            "read -P 0x5a 512 1024",
            "read -P 0 0 512",
            "read -P 0 1536 6656",
        ],
    );
    qemu_io_nbd(
        &a,
        &uri(port, "qcow2"),
        &[
            "write -P 0x11 100 3000",
            "write -P 0x22 65000 70000",
            "read -P 0x11 100 3000",
            "read -P 0x22 65000 70000",
            "read -P 0 0 100",
        ],
    );
    // The graph sees the same bytes.
    a.qemu_io("d0", "read -P 0x6b 8192 4096");
    a.qemu_io("fmt", "read -P 0x22 65000 70000");

    let console = a.quit();
    assert!(console.contains("=== block layer closed ==="), "{console}");

    let out = qemu_io(
        &raw,
        &[
            "read -P 0 0 512".into(),
            "read -P 0x5a 512 1024".into(),
            "read -P 0 1536 6656".into(),
            "read -P 0x6b 8192 4096".into(),
            "read -P 0 12288 4096".into(),
        ],
    );
    assert!(!out.contains("fail"), "{out}");
    let check = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&q)
        .output()
        .expect("qemu-img check");
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x11 100 3000"])
        .args(["-c", "read -P 0x22 65000 70000", "-c", "read -P 0 0 100"])
        .arg(&q)
        .output()
        .expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("fail"),
        "qcow2 on the host: {text}"
    );
}

#[test]
fn virtio_blk_with_4k_sectors_end_to_end() {
    end_to_end(Transport::VirtioBlk);
}

#[test]
fn scsi_hd_with_4k_sectors_end_to_end() {
    end_to_end(Transport::ScsiHd);
}

fn tempdir(what: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("blockhaus-4k-{what}-"))
        .tempdir()
        .expect("tempdir")
}
