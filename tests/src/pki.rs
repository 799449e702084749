//! Certificates for the TLS tests, made by `openssl` in the directory
//! layout QEMU and libnbd expect: the server reads `ca-cert.pem`,
//! `server-cert.pem`, `server-key.pem`; a client directory holds
//! `ca-cert.pem`, `client-cert.pem`, `client-key.pem` (QEMU's
//! `tls-creds-x509,dir=`, libnbd's `tls-certificates=`). And the runner
//! for the clients that use them.

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Run under `timeout` (a hung handshake fails the test instead of
/// hanging it).
pub fn run(program: &str, args: &[&str]) -> Output {
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

pub fn ok(program: &str, args: &[&str]) -> String {
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
pub fn fails(program: &str, args: &[&str]) -> String {
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

/// The server's names: loopback (slirp `hostfwd`) and the guest's
/// address on a tap ([`crate::qemu::NetnsTap::GUEST_IP`]).
const SERVER_EXT: &str = "basicConstraints=critical,CA:FALSE\n\
    keyUsage=critical,digitalSignature,keyEncipherment\n\
    extendedKeyUsage=serverAuth\n\
    subjectAltName=IP:127.0.0.1,IP:10.0.3.15,DNS:localhost\n";
const CLIENT_EXT: &str = "basicConstraints=critical,CA:FALSE\n\
    keyUsage=critical,digitalSignature,keyEncipherment\n\
    extendedKeyUsage=clientAuth\n";

/// Certificates for one test: `server/` (QEMU's server-side layout),
/// `client/` (CA and a client certificate), `anon/` (CA only), `rogue/`
/// (a client certificate from another CA).
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Default for Pki {
    fn default() -> Pki {
        Pki::new()
    }
}

impl Pki {
    pub fn new() -> Pki {
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

    pub fn path(&self, sub: &str) -> String {
        self.dir
            .path()
            .join(sub)
            .to_str()
            .expect("utf-8")
            .to_string()
    }

    pub fn read(&self, file: &str) -> Vec<u8> {
        fs::read(self.dir.path().join("server").join(file)).expect("read pem")
    }

    /// The client certificate's subject as openssl prints it in RFC
    /// 2253/4514 form (what GnuTLS gives QEMU's authz objects).
    pub fn client_dn(&self) -> String {
        let cert = format!("{}/client-cert.pem", self.path("client"));
        let out = ok(
            "openssl",
            &[
                "x509", "-in", &cert, "-noout", "-subject", "-nameopt", "RFC2253",
            ],
        );
        out.trim()
            .strip_prefix("subject=")
            .expect("subject=")
            .to_string()
    }
}
