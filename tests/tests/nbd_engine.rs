//! Layer 2 of DESIGN's tests: the NBD engine (`block::nbd`) behind the std
//! TCP adapter (`harness::nbd_server`), probed by the real clients
//! installed here — qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh — and by a
//! raw socket sending malformed packets. Every assertion is on bytes the
//! server stored or sent, or on what a client reported.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use harness::nbd_server::{Backing, NbdServer};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A child process killed and reaped on drop, so nothing outlives a
/// failing test.
struct Reaper(Option<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Run `cmd` with no stdin, capturing output, killing it after 120 s.
fn run(cmd: &mut Command) -> Output {
    let text = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{text}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let mut reaper = Reaper(Some(child));
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let c = reaper.0.as_mut().expect("child");
        if let Some(s) = c.try_wait().expect("try_wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "{text} timed out");
        thread::sleep(Duration::from_millis(10));
    };
    reaper.0 = None;
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Run and require success; returns stdout.
fn ok(cmd: &mut Command) -> String {
    let text = format!("{cmd:?}");
    let o = run(cmd);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{text} failed: {}\nstdout: {stdout}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = ok(&mut c);
    assert!(
        !out.contains("failed"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

/// nbdsh on Debian's python3 (a pyenv python3 first in PATH lacks the
/// `nbd` module).
fn nbdsh(script: &str) -> String {
    ok(Command::new("nbdsh")
        .env("PATH", "/usr/bin:/bin")
        .args(["-c", script]))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

fn server(size: u64) -> NbdServer {
    NbdServer::start(vec![NbdServer::memory_export("disk", size)]).expect("server starts")
}

#[test]
fn qemu_io_writes_reads_zeroes_fua_discard_flush() {
    let s = server(8 * MIB);
    let uri = s.uri("disk");
    let out = qemu_io(
        &uri,
        &[
            "write -P 0xa5 0 1M",
            "read -P 0xa5 0 1M",
            "write -z 1M 512k",
            "read -P 0 1M 512k",
            "write -f -P 0x11 2M 64k",
            "write -P 0x22 3M 1M",
            "discard 3M 1M",
            "flush",
            "read -P 0 3M 1M",
            "aio_write -P 0x33 5M 4k",
            "aio_write -P 0x44 6M 4k",
            "aio_flush",
        ],
    );
    assert!(
        out.contains("wrote 1048576/1048576 bytes at offset 0"),
        "{out}"
    );
    assert!(
        out.contains("read 1048576/1048576 bytes at offset 0"),
        "{out}"
    );
    assert!(
        out.contains("wrote 524288/524288 bytes at offset 1048576"),
        "{out}"
    );
    assert!(
        out.contains("discard 1048576/1048576 bytes at offset 3145728"),
        "{out}"
    );

    let disk = s.contents("disk").expect("memory export");
    assert!(disk[..MIB as usize].iter().all(|&b| b == 0xa5));
    assert!(
        disk[MIB as usize..(MIB + MIB / 2) as usize]
            .iter()
            .all(|&b| b == 0)
    );
    assert!(
        disk[2 * MIB as usize..(2 * MIB + 65536) as usize]
            .iter()
            .all(|&b| b == 0x11)
    );
    assert!(
        disk[3 * MIB as usize..4 * MIB as usize]
            .iter()
            .all(|&b| b == 0)
    );
    assert!(
        disk[5 * MIB as usize..(5 * MIB + 4096) as usize]
            .iter()
            .all(|&b| b == 0x33)
    );
    assert!(
        disk[6 * MIB as usize..(6 * MIB + 4096) as usize]
            .iter()
            .all(|&b| b == 0x44)
    );
    let st = s.stats();
    assert!(st.op("write+fua") >= 1, "{st:?}");
    assert!(st.op("write-zeroes") >= 1 && st.op("trim") >= 1, "{st:?}");
    assert!(st.op("flush") >= 2, "{st:?}");
}

#[test]
fn qemu_io_reads_back_a_pattern_written_by_the_host() {
    let s = server(4 * MIB);
    s.fill("disk", 4096, &[0x5c; 8192]);
    qemu_io(
        &s.uri("disk"),
        &["read -P 0x5c 4k 8k", "read -P 0 0 4k", "read -P 0 12k 1M"],
    );
}

#[test]
fn qemu_img_info_map_compare_convert_both_ways() {
    let s = server(4 * MIB);
    let uri = s.uri("disk");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut img = vec![0u8; 4 * MIB as usize];
    img[..65536].copy_from_slice(&pattern(65536, 1));
    img[MIB as usize..MIB as usize + 65536].copy_from_slice(&pattern(65536, 2));
    std::fs::write(&src, &img).unwrap();

    let info: Value = serde_json::from_str(&ok(Command::new("qemu-img").args([
        "info",
        "--output=json",
        &uri,
    ])))
    .unwrap();
    assert_eq!(info["virtual-size"], 4 * MIB, "{info}");

    ok(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri));
    let out = ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri));
    assert!(out.contains("Images are identical."), "{out}");
    assert_eq!(s.contents("disk").unwrap(), img);

    // The map comes from NBD_CMD_BLOCK_STATUS: data where convert wrote,
    // holes (reading as zeroes) elsewhere.
    let map: Value = serde_json::from_str(&ok(Command::new("qemu-img").args([
        "map",
        "--output=json",
        "-f",
        "raw",
        &uri,
    ])))
    .unwrap();
    let entries: Vec<(u64, u64, bool, bool)> = map
        .as_array()
        .expect("map is an array")
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        vec![
            (0, 65536, true, false),
            (65536, MIB - 65536, false, true),
            (MIB, 65536, true, false),
            (MIB + 65536, 3 * MIB - 65536, false, true),
        ],
        "{map}"
    );

    // And back: NBD → a new local file.
    let back = dir.path().join("back.raw");
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&back));
    assert_eq!(std::fs::read(&back).unwrap(), img);
}

#[test]
fn nbdinfo_json_list_map_and_can() {
    let mut ro = block::nbd::Export::new("ro", MIB);
    ro.description = "a read-only disk".into();
    ro.features = block::nbd::Features::read_only();
    let mut disk = block::nbd::Export::new("disk", 2 * MIB);
    disk.description = "the writable one".into();
    let s = NbdServer::start(vec![
        (disk, Backing::Memory { size: 2 * MIB }),
        (ro, Backing::Memory { size: MIB }),
    ])
    .unwrap();
    s.fill("disk", MIB, &[1; 8192]);

    let j: Value =
        serde_json::from_str(&ok(Command::new("nbdinfo").args(["--json", &s.uri("disk")])))
            .unwrap();
    assert_eq!(j["protocol"], "newstyle-fixed", "{j}");
    assert_eq!(j["TLS"], false);
    let e = &j["exports"][0];
    assert_eq!(e["export-name"], "disk", "{j}");
    assert_eq!(e["description"], "the writable one", "{j}");
    assert_eq!(e["export-size"], 2 * MIB, "{j}");
    for (k, v) in [
        ("is_read_only", false),
        ("is_rotational", false),
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_fast_zero", true),
        ("can_cache", true),
        ("can_df", true),
        ("can_multi_conn", true),
    ] {
        assert_eq!(e[k], v, "{k} in {j}");
    }
    assert_eq!(e["block_size_minimum"], 1, "{j}");
    assert_eq!(e["block_size_preferred"], 4096, "{j}");
    assert_eq!(e["block_size_maximum"], 32 * MIB, "{j}");
    let contexts = e["contexts"].as_array().expect("contexts");
    assert!(contexts.iter().any(|c| c == "base:allocation"), "{j}");

    let j: Value =
        serde_json::from_str(&ok(Command::new("nbdinfo").args(["--json", &s.uri("ro")]))).unwrap();
    let e = &j["exports"][0];
    assert_eq!(e["is_read_only"], true, "{j}");
    assert_eq!(e["can_trim"], false, "{j}");
    assert_eq!(e["can_zero"], false, "{j}");

    let list: Value = serde_json::from_str(&ok(Command::new("nbdinfo").args([
        "--list",
        "--json",
        &s.uri(""),
    ])))
    .unwrap();
    let names: Vec<(&str, &str)> = list["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap(),
                e["description"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        names,
        [("disk", "the writable one"), ("ro", "a read-only disk")],
        "{list}"
    );

    let map = ok(Command::new("nbdinfo").args(["--map", &s.uri("disk")]));
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        vec![
            vec!["0", "1048576", "3", "hole,zero"],
            vec!["1048576", "8192", "0", "data"],
            vec!["1056768", "1040384", "3", "hole,zero"],
        ],
        "{map}"
    );

    for what in [
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "cache",
        "multi-conn",
        "df",
    ] {
        let o = run(Command::new("nbdinfo").args(["--can", what, &s.uri("disk")]));
        assert_eq!(o.status.code(), Some(0), "--can {what}");
        let o = run(Command::new("nbdinfo").args(["--can", what, &s.uri("ro")]));
        let want = if ["cache", "multi-conn", "df"].contains(&what) {
            0
        } else {
            2
        };
        assert_eq!(o.status.code(), Some(want), "--can {what} on ro");
    }
    let o = run(Command::new("nbdinfo").args(["--is", "read-only", &s.uri("ro")]));
    assert_eq!(o.status.code(), Some(0));

    // An unknown export: NBD_REP_ERR_UNKNOWN with qemu-nbd's text.
    let o = run(Command::new("nbdinfo")
        .env("LIBNBD_DEBUG", "1")
        .arg(s.uri("nope")));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("server error message: export 'nope' not present"),
        "{err}"
    );
}

#[test]
fn nbdcopy_both_directions_with_multi_conn() {
    let s = server(16 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut img = vec![0u8; 16 * MIB as usize];
    for (i, chunk) in img.chunks_mut(MIB as usize).enumerate() {
        if i % 3 != 2 {
            chunk.copy_from_slice(&pattern(MIB as usize, i as u8));
        }
    }
    std::fs::write(&src, &img).unwrap();
    ok(Command::new("nbdcopy")
        .args(["--connections=4", "--threads=4", "--requests=16", "--flush"])
        .arg(&src)
        .arg(s.uri("disk")));
    assert!(s.contents("disk").unwrap() == img, "NBD holds the source");
    let st = s.wait_closes(4);
    assert!(
        st.transmissions >= 4,
        "multi-conn used 4 connections: {st:?}"
    );
    assert!(st.max_batch > 1, "requests were in flight together: {st:?}");
    assert!(st.op("flush") >= 1, "{st:?}");

    let dst = dir.path().join("dst.raw");
    std::fs::File::create(&dst).unwrap();
    ok(Command::new("nbdcopy")
        .args(["--connections=4", "--threads=4"])
        .arg(s.uri("disk"))
        .arg(&dst));
    assert!(
        std::fs::read(&dst).unwrap() == img,
        "the copy back is identical"
    );
    let st = s.stats();
    assert!(
        st.op("block-status") >= 1,
        "nbdcopy asked for extents: {st:?}"
    );
}

#[test]
fn nbdcopy_to_a_file_backed_export() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing.raw");
    std::fs::write(&backing, vec![0xffu8; 4 * MIB as usize]).unwrap();
    let src = dir.path().join("src.raw");
    let img = pattern(4 * MIB as usize, 9);
    std::fs::write(&src, &img).unwrap();
    let s = NbdServer::start(vec![NbdServer::file_export("f", &backing, false).unwrap()]).unwrap();
    ok(Command::new("nbdcopy").arg(&src).arg(s.uri("f")));
    drop(s);
    assert!(std::fs::read(&backing).unwrap() == img);
}

#[test]
fn nbdsh_structured_replies_block_status_and_exact_errors() {
    let mut ro = block::nbd::Export::new("ro", MIB);
    ro.features = block::nbd::Features::read_only();
    let s = NbdServer::start(vec![
        NbdServer::memory_export("disk", MIB),
        (ro, Backing::Memory { size: MIB }),
    ])
    .unwrap();
    let script = format!(
        r#"
h.add_meta_context("base:allocation")
h.connect_uri("{disk}")
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
assert h.get_size() == 1048576
h.pwrite(b"\x5a" * 8192, 65536)
assert h.pread(8192, 65536) == b"\x5a" * 8192
assert h.pread(4096, 0) == bytes(4096)
h.pwrite(b"\x01" * 4096, 0, nbd.CMD_FLAG_FUA)
h.flush()
entries = []
def cb(metacontext, offset, e, err):
    assert metacontext == "base:allocation"
    entries.extend(e)
h.block_status(1048576, 0, cb)
print("extents", entries)
assert entries == [4096, 0, 61440, 3, 8192, 0, 1048576 - 73728, 3], entries
one = []
h.block_status(65536, 4096, lambda m, o, e, err: one.extend(e), nbd.CMD_FLAG_REQ_ONE)
assert one == [61440, 3], one
h.zero(4096, 65536, nbd.CMD_FLAG_FAST_ZERO)
h.trim(4096, 8192)
h.cache(4096, 0)
h.set_strict_mode(0)
for (what, call, want) in [
    ("read past the end", lambda: h.pread(512, 1048576), "EINVAL"),
    ("write past the end", lambda: h.pwrite(b"x" * 512, 1048576 - 256), "ENOSPC"),
    ("zero past the end", lambda: h.zero(4096, 1048576), "ENOSPC"),
    ("trim past the end", lambda: h.trim(4096, 1048576), "EINVAL"),
    ("status past the end", lambda: h.block_status(4096, 1048576, cb), "EINVAL"),
    ("unknown flag", lambda: h.pread(512, 0, 1 << 9), "EINVAL"),
]:
    try:
        call()
        raise AssertionError(what + " succeeded")
    except nbd.Error as e:
        assert e.errno == want, (what, e.errno, e.string)
        print(what, "->", e.errno)
assert h.pread(4, 65536 + 4096) == b"\x5a" * 4
h.shutdown()

r = nbd.NBD()
r.connect_uri("{ro}")
assert r.is_read_only()
r.set_strict_mode(0)
for call in [lambda: r.pwrite(b"x" * 512, 0), lambda: r.trim(512, 0), lambda: r.zero(512, 0)]:
    try:
        call()
        raise AssertionError("write to a read-only export succeeded")
    except nbd.Error as e:
        assert e.errno == "EPERM", e.string
print("read-only -> EPERM")
r.shutdown()

# Simple replies, and the old NBD_OPT_EXPORT_NAME path.
o = nbd.NBD()
o.set_request_structured_replies(False)
o.set_handshake_flags(0)
o.connect_uri("{disk}")
assert not o.get_structured_replies_negotiated()
assert o.pread(4096, 69632) == b"\x5a" * 4096
# Holes around data in a simple reply: the zeroes are sent.
assert o.pread(12288, 65536) == bytes(4096) + b"\x5a" * 4096 + bytes(4096)
o.set_strict_mode(0)
try:
    o.pread(512, 1048576)
    raise AssertionError("read past the end succeeded")
except nbd.Error as e:
    assert e.errno == "EINVAL", e.string
o.shutdown()

# Option mode: list, info, an unknown export.
q = nbd.NBD()
q.set_opt_mode(True)
q.connect_uri("{disk}")
names = []
q.opt_list(lambda n, d: names.append(n))
assert names == ["disk", "ro"], names
q.set_export_name("ro")
q.opt_info()
assert q.get_size() == 1048576 and q.is_read_only()
q.set_export_name("nope")
try:
    q.opt_go()
    raise AssertionError("GO to a missing export succeeded")
except nbd.Error as e:
    # libnbd 1.14 keeps the server's text for its debug log.
    assert e.errno == "ENOENT", e.string
q.set_export_name("disk")
q.opt_go()
assert q.aio_is_ready()
q.shutdown()
print("ok")
"#,
        disk = s.uri("disk"),
        ro = s.uri("ro"),
    );
    let out = nbdsh(&script);
    assert!(out.ends_with("ok\n"), "{out}");
    assert!(out.contains("write past the end -> ENOSPC"), "{out}");
    let disk = s.contents("disk").unwrap();
    assert!(disk[..4096].iter().all(|&b| b == 1), "the FUA write landed");
    assert!(disk[65536..69632].iter().all(|&b| b == 0), "zeroed");
    assert!(disk[69632..73728].iter().all(|&b| b == 0x5a), "kept");
}

/// A raw client: read the greeting and finish the handshake with
/// `NBD_OPT_EXPORT_NAME` (no zeroes).
fn raw_connect(s: &NbdServer, name: &str) -> TcpStream {
    let mut t = TcpStream::connect(("127.0.0.1", s.port())).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut g = [0u8; 18];
    t.read_exact(&mut g).unwrap();
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    assert_eq!(g[16..], [0, 3]);
    t.write_all(&3u32.to_be_bytes()).unwrap();
    if !name.is_empty() {
        t.write_all(&option(1, name.as_bytes())).unwrap();
        let mut r = [0u8; 10];
        t.read_exact(&mut r).unwrap();
    }
    t
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn request(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&cmd.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

fn simple_reply(error: u32, cookie: u64) -> Vec<u8> {
    let mut b = 0x6744_6698u32.to_be_bytes().to_vec();
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b
}

fn read_n(t: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    t.read_exact(&mut v).unwrap();
    v
}

fn assert_closed(t: &mut TcpStream) {
    let mut b = [0u8; 64];
    match t.read(&mut b) {
        Ok(0) => {}
        Ok(n) => panic!("expected the server to close, got {:?}", &b[..n]),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected the server to close: {e}"),
    }
}

#[test]
fn raw_socket_malformed_packets_get_the_exact_replies() {
    let s = NbdServer::start(vec![NbdServer::memory_export("disk", MIB)]).unwrap();

    // Unknown option: NBD_REP_ERR_UNSUP with its text, then haggling goes
    // on; a wrong option magic then ends the connection.
    let mut t = raw_connect(&s, "");
    t.write_all(&option(0x1234, b"junk")).unwrap();
    let mut want = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
    want.extend_from_slice(&0x1234u32.to_be_bytes());
    want.extend_from_slice(&0x8000_0001u32.to_be_bytes());
    let msg = b"Unsupported option 4660";
    want.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    want.extend_from_slice(msg);
    assert_eq!(read_n(&mut t, want.len()), want);
    t.write_all(b"IHAVEOPX\0\0\0\x03\0\0\0\0").unwrap();
    assert_closed(&mut t);

    // Transmission with simple replies.
    let mut t = raw_connect(&s, "disk");
    // Unknown command: EINVAL, connection kept.
    t.write_all(&request(0, 42, 0x1111, 0, 0)).unwrap();
    assert_eq!(read_n(&mut t, 16), simple_reply(22, 0x1111));
    // Write past the end: ENOSPC after the payload is skipped.
    let mut w = request(0, 1, 0x2222, MIB - 512, 1024);
    w.extend_from_slice(&[0xee; 1024]);
    t.write_all(&w).unwrap();
    assert_eq!(read_n(&mut t, 16), simple_reply(28, 0x2222));
    // A write far above the 32 MiB maximum: its 40 MiB payload is skipped,
    // EINVAL, and the connection stays in step.
    let big = 40 * MIB as u32;
    t.write_all(&request(0, 1, 0x3333, 0, big)).unwrap();
    let zero = vec![0u8; MIB as usize];
    for _ in 0..40 {
        t.write_all(&zero).unwrap();
    }
    assert_eq!(read_n(&mut t, 16), simple_reply(22, 0x3333));
    // Read past the end: EINVAL; then a good read still works.
    t.write_all(&request(0, 0, 0x4444, MIB, 512)).unwrap();
    assert_eq!(read_n(&mut t, 16), simple_reply(22, 0x4444));
    t.write_all(&request(0, 0, 0x5555, 0, 512)).unwrap();
    assert_eq!(read_n(&mut t, 16), simple_reply(0, 0x5555));
    assert_eq!(read_n(&mut t, 512), vec![0; 512]);
    // Wrong request magic: hard disconnect.
    let mut bad = request(0, 0, 0x6666, 0, 512);
    bad[3] ^= 0xff;
    t.write_all(&bad).unwrap();
    assert_closed(&mut t);

    // A client that vanishes mid-write leaves the server serving others.
    let mut t = raw_connect(&s, "disk");
    t.write_all(&request(0, 1, 0x7777, 0, 4096)).unwrap();
    t.write_all(&[0xab; 100]).unwrap();
    drop(t);
    let mut t = raw_connect(&s, "disk");
    t.write_all(&request(0, 0, 0x8888, 0, 4096)).unwrap();
    assert_eq!(read_n(&mut t, 16), simple_reply(0, 0x8888));
    assert_eq!(
        read_n(&mut t, 4096),
        vec![0; 4096],
        "the torn write never landed"
    );
    // NBD_CMD_DISC: clean close, no reply.
    t.write_all(&request(0, 2, 0x9999, 0, 0)).unwrap();
    assert_closed(&mut t);

    let st = s.wait_closes(4);
    let closes = st.closes.join("\n");
    assert!(
        closes.contains("protocol error: Bad magic received"),
        "{closes}"
    );
    assert!(
        closes.contains("protocol error: invalid magic (got 0x25609"),
        "{closes}"
    );
    assert!(closes.contains("client disconnected"), "{closes}");
    assert!(closes.contains("connection closed"), "{closes}");
    let _ = Path::new("");
}

#[test]
fn qemu_io_obeys_advertised_block_sizes() {
    let mut e = block::nbd::Export::new("aligned", 4 * MIB);
    e.block_size = block::nbd::BlockSize::new(512, 4096, 64 * 1024).unwrap();
    let s = NbdServer::start(vec![(e, Backing::Memory { size: 4 * MIB })]).unwrap();
    // 1 MiB in 64 KiB pieces; an unaligned read and write go through
    // qemu's read-modify-write at 512-byte granularity.
    qemu_io(
        &s.uri("aligned"),
        &[
            "write -P 0xa5 0 1M",
            "read -P 0xa5 100 1000",
            "write -P 0x5a 700 10",
            "read -P 0x5a 700 10",
            "read -P 0xa5 0 700",
        ],
    );
    let st = s.stats();
    // qemu-io's default writethrough cache sends writes with FUA.
    let writes = st.op("write") + st.op("write+fua");
    assert!(writes >= 17, "split at the 64 KiB maximum: {st:?}");
    let disk = s.contents("aligned").unwrap();
    assert!(disk[..700].iter().all(|&b| b == 0xa5));
    assert!(disk[700..710].iter().all(|&b| b == 0x5a));
    assert!(disk[710..MIB as usize].iter().all(|&b| b == 0xa5));
}

#[test]
fn nbdinfo_content_probes_the_data_through_the_server() {
    let s = server(MIB);
    s.fill("disk", 510, &[0x55, 0xaa]);
    let j: Value = serde_json::from_str(&ok(Command::new("nbdinfo").args([
        "--json",
        "--content",
        &s.uri("disk"),
    ])))
    .unwrap();
    let content = j["exports"][0]["content"].as_str().unwrap_or_default();
    assert!(content.starts_with("DOS/MBR boot sector"), "{j}");
    assert!(s.stats().op("read") >= 1);
}

#[test]
fn fio_random_writes_at_queue_depth_32_verify() {
    let s = server(16 * MIB);
    let out = ok(Command::new("fio").args([
        "--name=nbd-verify",
        "--ioengine=nbd",
        &format!("--uri={}", s.uri("disk")),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=16M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    ]));
    let j: Value = serde_json::from_str(&out[out.find('{').unwrap_or(0)..]).expect("fio JSON");
    let job = &j["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], 16 * MIB, "{job}");
    assert_eq!(
        job["read"]["io_bytes"],
        16 * MIB,
        "verified by reading back: {job}"
    );
    let st = s.stats();
    assert!(st.max_batch > 1, "requests were in flight together: {st:?}");
}
