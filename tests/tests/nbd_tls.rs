//! NBD over TLS on the host: the engine behind `nbdtls::TlsConnection`
//! in the std adapter (`harness::nbd_server`), against libnbd
//! (nbdinfo, nbdcopy) and QEMU (qemu-img, qemu-io) with certificates made
//! by `openssl` here, in the directory layout both expect: the server
//! reads `ca-cert.pem`, `server-cert.pem`, `server-key.pem`; a client
//! directory holds `ca-cert.pem`, `client-cert.pem`, `client-key.pem`
//! (QEMU's `tls-creds-x509,dir=`, libnbd's `tls-certificates=`).

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use harness::nbd_server::NbdServer;
use nbdtls::{Credentials, TimeProvider, UnixTime};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

#[derive(Debug)]
struct SystemClock;

impl TimeProvider for SystemClock {
    fn current_time(&self) -> Option<UnixTime> {
        let d = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
        Some(UnixTime::since_unix_epoch(d))
    }
}

/// Run under `timeout` (a hung handshake fails the test instead of
/// hanging it).
fn run(program: &str, args: &[&str]) -> Output {
    let o = Command::new("timeout")
        .arg("120")
        .arg(program)
        .args(args)
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert_ne!(o.status.code(), Some(124), "{program} {args:?} timed out");
    o
}

fn ok(program: &str, args: &[&str]) -> String {
    let o = run(program, args);
    assert!(
        o.status.success(),
        "{program} {args:?} failed: {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Fails; returns stdout and stderr together.
fn fails(program: &str, args: &[&str]) -> String {
    let o = run(program, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!o.status.success(), "{program} {args:?} succeeded: {text}");
    text
}

/// A CA-signed certificate and key (P-256) named `name` in `dir`.
fn issue(dir: &Path, ca: &Path, name: &str, subject: &str, ext: &str) {
    let p = |f: &str| dir.join(f).to_str().expect("utf-8 path").to_string();
    let key = p(&format!("{name}-key.pem"));
    let csr = p(&format!("{name}.csr"));
    let extfile = p(&format!("{name}.ext"));
    fs::write(&extfile, ext).expect("ext file");
    ok(
        "openssl",
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            subject,
        ],
    );
    let ca_cert = ca.join("ca-cert.pem");
    let ca_key = ca.join("ca-key.pem");
    ok(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            ca_cert.to_str().expect("utf-8"),
            "-CAkey",
            ca_key.to_str().expect("utf-8"),
            "-set_serial",
            "2",
            "-days",
            "2",
            "-extfile",
            &extfile,
            "-out",
            &p(&format!("{name}-cert.pem")),
        ],
    );
}

/// A self-signed CA (`ca-cert.pem`, `ca-key.pem`) in `dir`.
fn make_ca(dir: &Path, cn: &str) {
    let p = |f: &str| dir.join(f).to_str().expect("utf-8 path").to_string();
    ok(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &p("ca-key.pem"),
            "-out",
            &p("ca-cert.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

const SERVER_EXT: &str = "basicConstraints=critical,CA:FALSE\n\
    keyUsage=critical,digitalSignature,keyEncipherment\n\
    extendedKeyUsage=serverAuth\n\
    subjectAltName=IP:127.0.0.1,DNS:localhost\n";
const CLIENT_EXT: &str = "basicConstraints=critical,CA:FALSE\n\
    keyUsage=critical,digitalSignature,keyEncipherment\n\
    extendedKeyUsage=clientAuth\n";

/// Certificates for one test: `server/` (QEMU's server-side layout),
/// `client/` (CA and a client certificate), `anon/` (CA only), `rogue/`
/// (a client certificate from another CA).
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("blockhaus-tls")
            .tempdir()
            .expect("tempdir");
        let root = dir.path();
        let ca = root.join("ca");
        let rogue_ca = root.join("rogue-ca");
        for d in ["ca", "rogue-ca", "server", "client", "anon", "rogue"] {
            fs::create_dir(root.join(d)).expect("mkdir");
        }
        make_ca(&ca, "blockhaus test CA");
        make_ca(&rogue_ca, "some other CA");
        issue(
            &root.join("server"),
            &ca,
            "server",
            "/CN=localhost",
            SERVER_EXT,
        );
        issue(
            &root.join("client"),
            &ca,
            "client",
            "/O=blockhaus/CN=client",
            CLIENT_EXT,
        );
        issue(
            &root.join("rogue"),
            &rogue_ca,
            "client",
            "/CN=rogue",
            CLIENT_EXT,
        );
        for d in ["server", "client", "anon", "rogue"] {
            fs::copy(ca.join("ca-cert.pem"), root.join(d).join("ca-cert.pem")).expect("copy");
        }
        Pki { dir }
    }

    fn path(&self, sub: &str) -> String {
        self.dir
            .path()
            .join(sub)
            .to_str()
            .expect("utf-8")
            .to_string()
    }

    fn read(&self, file: &str) -> Vec<u8> {
        fs::read(self.dir.path().join("server").join(file)).expect("read pem")
    }

    /// The server's credentials; with `verify_peer`, clients must show a
    /// certificate from the CA.
    fn creds(&self, verify_peer: bool) -> Credentials {
        let ca = self.read("ca-cert.pem");
        Credentials::from_pem(
            &self.read("server-cert.pem"),
            &self.read("server-key.pem"),
            verify_peer.then_some(&ca[..]),
            Arc::new(SystemClock),
        )
        .expect("credentials")
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ (i >> 9) as u8)
        .collect()
}

fn tls_server(pki: &Pki, verify_peer: bool) -> NbdServer {
    let s = NbdServer::start_tls(
        vec![NbdServer::memory_export("disk", SIZE)],
        pki.creds(verify_peer),
    )
    .expect("server starts");
    s.fill("disk", 0, &pattern(SIZE as usize));
    s
}

fn nbds(s: &NbdServer, certs: &str) -> String {
    format!(
        "nbds://127.0.0.1:{}/disk?tls-certificates={certs}",
        s.port()
    )
}

#[test]
fn libnbd_reads_and_writes_over_tls() {
    let pki = Pki::new();
    let s = tls_server(&pki, false);
    let uri = nbds(&s, &pki.path("client"));
    let info = ok("nbdinfo", &["--json", &uri]);
    assert!(info.contains("\"export-size\": 8388608"), "{info}");
    assert!(info.contains("\"TLS\": true"), "{info}");
    // NBD_OPT_LIST inside TLS names the export.
    let list = ok("nbdinfo", &["--list", &uri]);
    assert!(list.contains("export=\"disk\""), "{list}");
    // The whole disk down, through TLS records of every size...
    let out = pki.dir.path().join("down.raw");
    ok("nbdcopy", &[&uri, out.to_str().expect("utf-8")]);
    assert!(fs::read(&out).expect("read") == pattern(SIZE as usize));
    // ... and other bytes up.
    let up: Vec<u8> = pattern(SIZE as usize).iter().map(|b| !b).collect();
    let src = pki.dir.path().join("up.raw");
    fs::write(&src, &up).expect("write");
    ok("nbdcopy", &[src.to_str().expect("utf-8"), &uri]);
    assert!(s.contents("disk").expect("memory export") == up);
    // nbdcopy opens several connections; each ended with NBD_CMD_DISC
    // (the listing with NBD_OPT_ABORT) read through TLS.
    let stats = s.stats();
    assert!(stats.op("read") > 0 && stats.op("write") > 0, "{stats:?}");
    let stats = s.wait_closes(stats.connections);
    assert!(
        stats
            .closes
            .iter()
            .all(|c| c == "client disconnected" || c == "client aborted the negotiation"),
        "{stats:?}"
    );
}

#[test]
fn qemu_img_and_qemu_io_speak_tls() {
    let pki = Pki::new();
    let s = tls_server(&pki, false);
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        pki.path("client")
    );
    let opts = format!(
        "driver=nbd,host=127.0.0.1,port={},export=disk,tls-creds=tls0",
        s.port()
    );
    let info = ok(
        "qemu-img",
        &["info", "--object", &object, "--image-opts", &opts],
    );
    assert!(
        info.contains("virtual size: 8 MiB (8388608 bytes)"),
        "{info}"
    );
    let want = pattern(SIZE as usize)[MIB as usize];
    let out = ok(
        "qemu-io",
        &[
            "--object",
            &object,
            "--image-opts",
            &opts,
            "-c",
            &format!("read -P 0x{want:02x} 1M 1"),
            "-c",
            "write -P 0x5a 2M 1M",
            "-c",
            "read -P 0x5a 2M 1M",
        ],
    );
    assert!(!out.contains("fail"), "{out}");
    let data = s.contents("disk").expect("memory export");
    assert!(
        data[2 * MIB as usize..3 * MIB as usize]
            .iter()
            .all(|&b| b == 0x5a)
    );
    assert_eq!(
        data[..2 * MIB as usize],
        pattern(SIZE as usize)[..2 * MIB as usize]
    );
}

#[test]
fn plain_text_clients_get_tls_reqd_and_read_nothing() {
    let pki = Pki::new();
    let s = tls_server(&pki, false);
    let plain = format!("nbd://127.0.0.1:{}/disk", s.port());
    let text = fails("nbdinfo", &[&plain]);
    assert!(text.contains("TLS"), "{text}");
    let text = fails("nbdinfo", &["--list", &plain]);
    assert!(!text.contains("disk"), "the export name leaked: {text}");
    let text = fails("qemu-img", &["info", &plain]);
    assert!(
        text.contains("TLS negotiation required before option 7 (go)")
            && text.contains("server reported: Option 0x7 not permitted before TLS"),
        "{text}"
    );
    let text = fails("qemu-io", &["-f", "raw", "-c", "read 0 512", &plain]);
    assert!(text.contains("not permitted before TLS"), "{text}");
    let stats = s.wait_closes(4);
    assert_eq!(stats.transmissions, 0, "{stats:?}");
    assert!(stats.ops.is_empty(), "{stats:?}");
}

#[test]
fn verify_peer_admits_only_clients_with_a_certificate_from_the_ca() {
    let pki = Pki::new();
    let s = tls_server(&pki, true);
    let info = ok("nbdinfo", &["--size", &nbds(&s, &pki.path("client"))]);
    assert_eq!(info.trim(), "8388608");
    fails("nbdinfo", &["--size", &nbds(&s, &pki.path("anon"))]);
    fails("nbdinfo", &["--size", &nbds(&s, &pki.path("rogue"))]);
    let stats = s.wait_closes(3);
    assert_eq!(stats.transmissions, 1, "{stats:?}");
    assert_eq!(
        stats.ops.len(),
        0,
        "nbdinfo --size reads nothing: {stats:?}"
    );
    assert!(
        stats
            .closes
            .iter()
            .filter(|c| c.starts_with("TLS:"))
            .count()
            == 2,
        "{stats:?}"
    );
}

#[test]
fn credentials_refuse_bad_pem() {
    let pki = Pki::new();
    let clock: Arc<dyn TimeProvider> = Arc::new(SystemClock);
    let cert = pki.read("server-cert.pem");
    let key = pki.read("server-key.pem");
    let e = Credentials::from_pem(b"", &key, None, clock.clone()).expect_err("no cert");
    assert!(e.0.contains("No certificate"), "{e}");
    let e = Credentials::from_pem(&cert, b"junk", None, clock.clone()).expect_err("no key");
    assert!(e.0.contains("server key"), "{e}");
    // A key that is not the certificate's.
    let other = fs::read(pki.dir.path().join("client").join("client-key.pem")).expect("key");
    let e = Credentials::from_pem(&cert, &other, None, clock.clone()).expect_err("wrong key");
    assert!(e.0.contains("does not match"), "{e}");
    let e = Credentials::from_pem(&cert, &key, Some(b"nothing"), clock).expect_err("no CA");
    assert!(e.0.contains("CA certificate"), "{e}");
}
