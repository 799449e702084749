//! NBD over TLS on the booted appliance (issue 17, point 1): credentials
//! made by `openssl` here, given to the appliance as PEM text through
//! QMP `object-add tls-creds-x509` (`x-ca-cert`, `x-server-cert`,
//! `x-server-key`), named by `nbd-server-start`'s `tls-creds`; libnbd
//! (nbdinfo) and QEMU (qemu-img, qemu-io) connect through QEMU's user
//! network with their own certificate directories.
//!
//! TLS needs the CPU's RDRAND/RDSEED: QEMU's default TCG CPU has neither,
//! so these boots use `-cpu max`, and one boot without it checks the
//! refusal.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use harness::host::{MIB, create, qemu_io};
use harness::pki::{Pki, fails, ok};
use harness::qemu::free_port;
use harness::{Appliance, QemuConfig};
use serde_json::{Value, json};

const BLOCKDEV: &str = "--blockdev driver=virtio-blk,node-name=vblk,serial=disk0";

/// `-cpu max`: RDRAND and RDSEED under TCG.
const CPU_MAX: &[&str] = &["-cpu", "max"];

/// The appliance with `img` as `vblk` and NBD forwarded from the host,
/// with `extra` QEMU arguments.
fn boot(img: &Path, extra: &[&str]) -> (Appliance, u16) {
    let port = free_port();
    let extra = extra.iter().map(|&a| a.into()).collect();
    let cfg = QemuConfig {
        append: BLOCKDEV.into(),
        disks: vec![img.to_path_buf()],
        nbd_port: Some(port),
        extra,
        ..QemuConfig::default()
    };
    (Appliance::boot(&cfg), port)
}

fn pem(pki: &Pki, file: &str) -> String {
    String::from_utf8(pki.read(file)).expect("PEM is text")
}

/// `object-add tls-creds-x509` with the server's PEM files from `pki`.
fn creds(pki: &Pki, id: &str, verify_peer: bool) -> Value {
    json!({
        "qom-type": "tls-creds-x509", "id": id, "endpoint": "server",
        "verify-peer": verify_peer,
        "x-ca-cert": pem(pki, "ca-cert.pem"),
        "x-server-cert": pem(pki, "server-cert.pem"),
        "x-server-key": pem(pki, "server-key.pem"),
    })
}

fn addr() -> Value {
    json!({"type": "inet", "host": "0.0.0.0", "port": "10809"})
}

/// Starts the server with `args` (besides `addr`) and exports `vblk` as
/// `disk`.
fn serve(a: &mut Appliance, mut args: Value) {
    args["addr"] = addr();
    let q = a.qmp();
    q.cmd("nbd-server-start", args).expect("nbd-server-start");
    q.cmd(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "vblk", "name": "disk",
               "writable": true}),
    )
    .expect("block-export-add");
}

fn error(a: &mut Appliance, cmd: &str, args: Value) -> String {
    let reply = a.qmp().execute(cmd, args).expect("reply");
    reply["error"]["desc"]
        .as_str()
        .unwrap_or_else(|| panic!("{cmd} succeeded: {reply}"))
        .to_string()
}

fn nbds(port: u16, certs: &str) -> String {
    format!("nbds://127.0.0.1:{port}/disk?tls-certificates={certs}")
}

/// A 16 MiB raw image, 0x3c in its first MiB.
fn image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("disk.img");
    create(&img, 16 * MIB);
    qemu_io(&img, &["write -P 0x3c 0 1M".into()]);
    img
}

/// The disk after the test's write: 0x3c in the first MiB (from
/// [`image`]), 0x5a in the third (written over TLS), zeroes elsewhere.
fn check_written(data: &[u8]) {
    let mib = MIB as usize;
    assert_eq!(data.len(), 16 * mib);
    assert!(data[..mib].iter().all(|&b| b == 0x3c));
    assert!(data[mib..2 * mib].iter().all(|&b| b == 0));
    assert!(data[2 * mib..3 * mib].iter().all(|&b| b == 0x5a));
    assert!(data[3 * mib..].iter().all(|&b| b == 0));
}

/// Read requests `vblk` has served.
fn vblk_reads(a: &mut Appliance) -> u64 {
    let stats = a
        .qmp()
        .cmd("query-blockstats", json!({}))
        .expect("query-blockstats");
    stats
        .as_array()
        .and_then(|l| l.iter().find(|s| s["node-name"] == "vblk"))
        .and_then(|s| s["stats"]["rd_operations"].as_u64())
        .unwrap_or_else(|| panic!("{stats}"))
}

/// Median wall time of `n` runs of `nbdinfo --size uri`.
fn nbdinfo_time(uri: &str, n: usize) -> Duration {
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            ok("nbdinfo", &["--size", uri]);
            t.elapsed()
        })
        .collect();
    times.sort();
    times[n / 2]
}

#[test]
fn libnbd_and_qemu_speak_tls_to_the_appliance_and_plain_text_reads_nothing() {
    let pki = Pki::new();
    let img = image(pki.dir.path());
    let (mut a, port) = boot(&img, CPU_MAX);
    // PEM text that cannot be read is refused by object-add, as QEMU
    // refuses credential files it cannot load; nothing is added.
    let junk = |cert: &str, key: &str| {
        json!({"qom-type": "tls-creds-x509", "id": "junk", "endpoint": "server",
               "verify-peer": false, "x-server-cert": cert, "x-server-key": key})
    };
    let (cert, key) = (pem(&pki, "server-cert.pem"), pem(&pki, "server-key.pem"));
    let e = error(&mut a, "object-add", junk("junk", &key));
    assert_eq!(e, "No certificate found in the server certificate");
    let e = error(&mut a, "object-add", junk(&cert, "junk"));
    assert!(e.starts_with("Unable to parse the server key"), "{e}");
    let mut bad_ca = creds(&pki, "junk", true);
    bad_ca["x-ca-cert"] = json!("junk");
    let e = error(&mut a, "object-add", bad_ca);
    assert_eq!(e, "No certificate found in the CA certificate");
    // A well-formed key of another certificate is found when the server
    // starts with it (that check signs, so it needs the random source).
    let client_key = String::from_utf8(
        std::fs::read(format!("{}/client-key.pem", pki.path("client"))).expect("client key"),
    )
    .expect("PEM is text");
    a.qmp()
        .cmd("object-add", junk(&cert, &client_key))
        .expect("object-add of a well-formed key");
    let e = error(
        &mut a,
        "nbd-server-start",
        json!({"addr": addr(), "tls-creds": "junk"}),
    );
    assert_eq!(e, "The server key does not match the server certificate");
    let e = error(
        &mut a,
        "nbd-server-start",
        json!({"addr": addr(), "tls-creds": "nothing"}),
    );
    assert_eq!(e, "No TLS credentials with id 'nothing'");
    a.qmp()
        .cmd("object-add", creds(&pki, "tls0", false))
        .expect("object-add");
    serve(&mut a, json!({"tls-creds": "tls0"}));

    let uri = nbds(port, &pki.path("client"));
    let info = ok("nbdinfo", &["--json", &uri]);
    assert!(info.contains("\"export-size\": 16777216"), "{info}");
    assert!(info.contains("\"TLS\": true"), "{info}");
    let list = ok("nbdinfo", &["--list", &uri]);
    assert!(list.contains("export=\"disk\""), "{list}");

    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        pki.path("client")
    );
    let opts = format!("driver=nbd,host=127.0.0.1,port={port},export=disk,tls-creds=tls0");
    let info = ok(
        "qemu-img",
        &["info", "--object", &object, "--image-opts", &opts],
    );
    assert!(info.contains("virtual size: 16 MiB"), "{info}");
    let out = ok(
        "qemu-io",
        &[
            "--object",
            &object,
            "--image-opts",
            &opts,
            "-c",
            "read -P 0x3c 0 1M",
            "-c",
            "write -P 0x5a 2M 1M",
            "-c",
            "read -P 0x5a 2M 1M",
        ],
    );
    assert!(!out.contains("fail"), "{out}");
    // The whole disk down through TLS records of every size (nbdcopy's
    // parallel connections and large reads).
    let down = pki.dir.path().join("down.raw");
    ok("nbdcopy", &[&uri, down.to_str().expect("utf-8")]);
    check_written(&fs::read(&down).expect("read"));

    // Plain text: TLS_REQD for every option, no export seen, no byte read.
    let reads = vblk_reads(&mut a);
    let plain = format!("nbd://127.0.0.1:{port}/disk");
    let text = fails("nbdinfo", &[&plain]);
    assert!(text.contains("TLS"), "{text}");
    let text = fails("nbdinfo", &["--list", &plain]);
    assert!(!text.contains("disk"), "the export name leaked: {text}");
    let text = fails("qemu-io", &["-f", "raw", "-c", "read 0 512", &plain]);
    assert!(text.contains("not permitted before TLS"), "{text}");
    assert_eq!(vblk_reads(&mut a), reads, "a plain-text client read");

    // The cost of the handshake under TCG, for the report (no assertion).
    let tls = nbdinfo_time(&uri, 5);
    eprintln!("nbdinfo --size over TLS: median {tls:?} of 5 runs");

    // verify-peer: only clients with a certificate from the CA get in.
    a.qmp().cmd("nbd-server-stop", json!({})).expect("stop");
    a.qmp()
        .cmd("object-add", creds(&pki, "tlsv", true))
        .expect("object-add");
    serve(&mut a, json!({"tls-creds": "tlsv"}));
    let size = ok("nbdinfo", &["--size", &nbds(port, &pki.path("client"))]);
    assert_eq!(size.trim(), "16777216");
    fails("nbdinfo", &["--size", &nbds(port, &pki.path("anon"))]);
    fails("nbdinfo", &["--size", &nbds(port, &pki.path("rogue"))]);

    // tls-authz: authz-simple admits the one client distinguished name.
    for (id, identity, admitted) in [
        ("authz0", pki.client_dn(), true),
        ("authz1", "CN=someone else,O=blockhaus".to_string(), false),
    ] {
        a.qmp().cmd("nbd-server-stop", json!({})).expect("stop");
        a.qmp()
            .cmd(
                "object-add",
                json!({"qom-type": "authz-simple", "id": id, "identity": identity}),
            )
            .expect("object-add");
        serve(&mut a, json!({"tls-creds": "tlsv", "tls-authz": id}));
        let uri = nbds(port, &pki.path("client"));
        if admitted {
            assert_eq!(ok("nbdinfo", &["--size", &uri]).trim(), "16777216");
        } else {
            fails("nbdinfo", &["--size", &uri]);
        }
    }
    let console = a.quit();
    assert!(
        console.contains("TLS x509 authz check for CN=client,O=blockhaus is denied"),
        "{console}"
    );
    assert!(console.contains("nbd: TLS required"), "{console}");

    // The write over TLS is on the disk.
    check_written(&fs::read(&img).expect("image"));
}

/// Plain text for comparison with the TLS figure above (no assertion).
#[test]
fn the_plain_text_handshake_for_comparison() {
    let pki = Pki::new();
    let img = image(pki.dir.path());
    let (mut a, port) = boot(&img, CPU_MAX);
    serve(&mut a, json!({}));
    let plain = nbdinfo_time(&format!("nbd://127.0.0.1:{port}/disk"), 5);
    eprintln!("nbdinfo --size in plain text: median {plain:?} of 5 runs");
    a.quit();
}

/// Without RDRAND or RDSEED (QEMU's default TCG CPU) and without a
/// virtio-rng device TLS is refused, clearly, and no server is started.
#[test]
fn tls_is_refused_without_a_random_source() {
    let pki = Pki::new();
    let img = image(pki.dir.path());
    let (mut a, _port) = boot(&img, &[]);
    a.qmp()
        .cmd("object-add", creds(&pki, "tls0", false))
        .expect("object-add");
    let e = error(
        &mut a,
        "nbd-server-start",
        json!({"addr": addr(), "tls-creds": "tls0"}),
    );
    assert_eq!(
        e,
        "TLS needs a random source: the CPU has no RDRAND or RDSEED (boot QEMU with -cpu max \
         or -cpu host) and there is no virtio-rng device (-device virtio-rng-pci)"
    );
    // Not running: a plain server can start.
    a.qmp()
        .cmd("nbd-server-start", json!({"addr": addr()}))
        .expect("nbd-server-start");
    a.quit();
}

/// The boot options: `--object` in its JSON form carries the PEM text
/// (newlines as `\n`), `--nbd-server` names it.
#[test]
fn tls_from_the_kernel_command_line() {
    let pki = Pki::new();
    let img = image(pki.dir.path());
    let object = json!({
        "qom-type": "tls-creds-x509", "id": "tls0", "endpoint": "server",
        "verify-peer": false,
        "x-server-cert": pem(&pki, "server-cert.pem"),
        "x-server-key": pem(&pki, "server-key.pem"),
    });
    let port = free_port();
    let cfg = QemuConfig {
        append: format!(
            "{BLOCKDEV} --object {object} \
             --nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809,tls-creds=tls0 \
             --export type=nbd,id=e0,node-name=vblk,name=disk"
        ),
        disks: vec![img.to_path_buf()],
        nbd_port: Some(port),
        extra: CPU_MAX.iter().map(|&a| a.into()).collect(),
        ..QemuConfig::default()
    };
    let a = Appliance::boot(&cfg);
    let size = ok("nbdinfo", &["--size", &nbds(port, &pki.path("anon"))]);
    assert_eq!(size.trim(), "16777216");
    let text = fails("nbdinfo", &[&format!("nbd://127.0.0.1:{port}/disk")]);
    assert!(text.contains("TLS"), "{text}");
    a.quit();
}

/// On QEMU's default TCG CPU (no RDRAND, no RDSEED) a virtio-rng device
/// is the random source.
#[test]
fn virtio_rng_stands_in_for_rdrand() {
    let pki = Pki::new();
    let img = image(pki.dir.path());
    let (mut a, port) = boot(&img, &["-device", "virtio-rng-pci"]);
    a.qmp()
        .cmd("object-add", creds(&pki, "tls0", false))
        .expect("object-add");
    serve(&mut a, json!({"tls-creds": "tls0"}));
    for _ in 0..3 {
        let size = ok("nbdinfo", &["--size", &nbds(port, &pki.path("client"))]);
        assert_eq!(size.trim(), "16777216");
    }
    let console = a.quit();
    assert!(console.contains("random source virtio-rng"), "{console}");
}

/// An NBD client on OpenSSL (Python's `ssl`): the fixed newstyle
/// handshake, `NBD_OPT_STARTTLS`, the TLS handshake; prints the cipher
/// suite and the protocol the server chose, then `NBD_OPT_ABORT`.
const STARTTLS_CLIENT: &str = r#"
import socket, ssl, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=60)
def recv(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            sys.exit("server closed")
        b += c
    return b
assert recv(18)[:16] == b"NBDMAGICIHAVEOPT"
s.sendall(struct.pack(">I", 3))
s.sendall(b"IHAVEOPT" + struct.pack(">II", 5, 0))
magic, opt, rep, length = struct.unpack(">QIII", recv(20))
assert (magic, opt, rep, length) == (0x3e889045565a9, 5, 1, 0), (magic, opt, rep, length)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(sys.argv[2])
t = ctx.wrap_socket(s, server_hostname="localhost")
print(t.cipher()[0], t.version())
print("client offered:", ",".join(c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"))
t.sendall(b"IHAVEOPT" + struct.pack(">II", 2, 0))
"#;

/// The appliance's ciphers run in portable software, where
/// ChaCha20-Poly1305 is several times faster than AES-GCM: it is chosen
/// even from a client that lists AES-GCM first (OpenSSL does).
#[test]
fn the_appliance_chooses_chacha20_poly1305() {
    let pki = Pki::new();
    let img = image(pki.dir.path());
    let (mut a, port) = boot(&img, CPU_MAX);
    a.qmp()
        .cmd("object-add", creds(&pki, "tls0", false))
        .expect("object-add");
    serve(&mut a, json!({"tls-creds": "tls0"}));
    let ca = format!("{}/ca-cert.pem", pki.path("anon"));
    let out = ok("python3", &["-c", STARTTLS_CLIENT, &port.to_string(), &ca]);
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("TLS_CHACHA20_POLY1305_SHA256 TLSv1.3"),
        "{out}"
    );
    let offered = lines.next().expect("the client's list");
    assert!(
        offered.starts_with("client offered: TLS_AES_256_GCM_SHA384,"),
        "the client must prefer AES-GCM for this test to mean anything: {out}"
    );
    a.quit();
}
