//! NBD over TLS on the host: the engine behind `nbdtls::TlsConnection`
//! in the std adapter (`harness::nbd_server`), against libnbd
//! (nbdinfo, nbdcopy) and QEMU (qemu-img, qemu-io) with certificates made
//! by `openssl` here, in the directory layout both expect: the server
//! reads `ca-cert.pem`, `server-cert.pem`, `server-key.pem`; a client
//! directory holds `ca-cert.pem`, `client-cert.pem`, `client-key.pem`
//! (QEMU's `tls-creds-x509,dir=`, libnbd's `tls-certificates=`).

use std::fs;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use harness::nbd_server::NbdServer;
use harness::pki::{Pki, fails, ok};
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

/// The server's credentials from `pki`'s `server/`; with `verify_peer`,
/// clients must show a certificate from the CA.
fn creds(pki: &Pki, verify_peer: bool) -> Credentials {
    let ca = pki.read("ca-cert.pem");
    Credentials::from_pem(
        &pki.read("server-cert.pem"),
        &pki.read("server-key.pem"),
        verify_peer.then_some(&ca[..]),
        Arc::new(SystemClock),
    )
    .expect("credentials")
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ (i >> 9) as u8)
        .collect()
}

fn tls_server(pki: &Pki, verify_peer: bool) -> NbdServer {
    let s = NbdServer::start_tls(
        vec![NbdServer::memory_export("disk", SIZE)],
        creds(pki, verify_peer),
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

/// `tls-authz` with `authz-simple`: only the client whose certificate's
/// distinguished name is the identity gets in; it needs verify-peer.
#[test]
fn authz_admits_only_the_named_client() {
    let pki = Pki::new();
    let dn = pki.client_dn();
    assert_eq!(dn, "CN=client,O=blockhaus");
    let e = creds(&pki, false)
        .with_authz(&dn)
        .expect_err("no verify-peer");
    assert!(e.0.contains("verify-peer"), "{e}");

    let s = NbdServer::start_tls(
        vec![NbdServer::memory_export("disk", SIZE)],
        creds(&pki, true).with_authz(&dn).expect("authz"),
    )
    .expect("server starts");
    let info = ok("nbdinfo", &["--size", &nbds(&s, &pki.path("client"))]);
    assert_eq!(info.trim(), "8388608");
    fails("nbdinfo", &["--size", &nbds(&s, &pki.path("anon"))]);

    let other = NbdServer::start_tls(
        vec![NbdServer::memory_export("disk", SIZE)],
        creds(&pki, true)
            .with_authz("CN=someone else,O=blockhaus")
            .expect("authz"),
    )
    .expect("server starts");
    let text = fails("nbdinfo", &["--size", &nbds(&other, &pki.path("client"))]);
    assert!(!text.contains("8388608"), "{text}");
    let stats = other.wait_closes(1);
    assert_eq!(stats.transmissions, 0, "{stats:?}");
    assert!(
        stats
            .closes
            .iter()
            .any(|c| c == "TLS: TLS x509 authz check for CN=client,O=blockhaus is denied"),
        "{stats:?}"
    );
}
