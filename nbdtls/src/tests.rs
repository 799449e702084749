//! The TLS layer driven by rustls's own client, byte by byte and in
//! every chunking, plus hostile input: deterministic, no sockets.

use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use std::io::{Read, Write};

use block::nbd::{Completion, Export, Limits, Op};
use pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

use super::*;

const CA: &[u8] = include_bytes!("testdata/ca-cert.pem");
const CERT: &[u8] = include_bytes!("testdata/server-cert.pem");
const KEY: &[u8] = include_bytes!("testdata/server-key.pem");

#[derive(Debug)]
struct Clock;

impl TimeProvider for Clock {
    fn current_time(&self) -> Option<UnixTime> {
        // 2026-12-01: inside the test certificates' validity.
        Some(UnixTime::since_unix_epoch(core::time::Duration::from_secs(
            1_796_083_200,
        )))
    }
}

fn creds() -> Credentials {
    Credentials::from_pem(CERT, KEY, None, Arc::new(Clock)).expect("credentials")
}

fn client() -> ClientConnection {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(CA) {
        roots.add(c.expect("CA")).expect("root");
    }
    let config = ClientConfig::builder_with_provider(Arc::new(rustls_rustcrypto::provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    ClientConnection::new(
        Arc::new(config),
        ServerName::try_from("localhost").expect("name"),
    )
    .expect("client")
}

fn option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"IHAVEOPT");
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// Server and client, the wire between them cut into `chunk`-byte pieces.
struct Pair {
    server: TlsConnection,
    client: ClientConnection,
    exports: Vec<Export>,
    chunk: usize,
    /// Bytes on the wire to the server not yet taken.
    to_server: Vec<u8>,
}

impl Pair {
    /// Greeting, flags and STARTTLS in plain text (the client's hello in
    /// the same write), then the handshake.
    fn new(chunk: usize) -> Pair {
        let mut p = Pair {
            server: TlsConnection::new(Limits::default(), creds()),
            client: client(),
            exports: vec![Export::new("disk", 1 << 20)],
            chunk,
            to_server: Vec::new(),
        };
        assert_eq!(p.server.output().len(), 18);
        assert_eq!(&p.server.output()[..8], b"NBDMAGIC");
        p.server.consume_output(18);
        p.to_server.extend_from_slice(&1u32.to_be_bytes());
        p.to_server.extend_from_slice(&option(5, &[]));
        p.client.write_tls(&mut p.to_server).expect("client hello");
        p.feed();
        // The plain ACK first, then the TLS records.
        let out = p.server.output();
        assert!(out.len() > 20);
        assert_eq!(&out[12..16], &1u32.to_be_bytes(), "ACK");
        p.server.consume_output(20);
        for _ in 0..100 {
            p.pump();
            if !p.client.is_handshaking() && p.server.tls_active() {
                break;
            }
        }
        assert!(p.server.tls_active(), "{:?}", p.server);
        p
    }

    /// Feed the server what is on the wire, `chunk` bytes at a time;
    /// whether it took anything.
    fn feed(&mut self) -> bool {
        let mut moved = false;
        while !self.to_server.is_empty() {
            let n = self.chunk.min(self.to_server.len());
            let took = self.server.receive(&self.to_server[..n], &self.exports);
            if took == 0 {
                break;
            }
            self.to_server.drain(..took);
            moved = true;
        }
        moved
    }

    /// Move bytes both ways until nothing moves.
    fn pump(&mut self) {
        loop {
            let mut buf = Vec::new();
            let _ = self.client.write_tls(&mut buf);
            self.to_server.extend_from_slice(&buf);
            let mut moved = self.feed();
            self.serve_requests();
            {
                let out = self.server.output().to_vec();
                if !out.is_empty() {
                    let mut slice = &out[..];
                    // The client holds at most 16 KiB of plaintext unread:
                    // stop there, `recv` reads it.
                    while !slice.is_empty() {
                        match self.client.read_tls(&mut slice) {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {
                                self.client.process_new_packets().expect("client TLS");
                            }
                        }
                    }
                    let used = out.len() - slice.len();
                    self.server.consume_output(used);
                    moved |= used > 0;
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn serve_requests(&mut self) {
        while let Some(r) = self.server.engine().next_request() {
            let c = match r.op {
                Op::Read { offset, len } => {
                    Completion::Data((offset..offset + len).map(|i| i as u8 ^ 0x5a).collect())
                }
                _ => Completion::Done,
            };
            self.server.engine().complete(r.id, c).expect("complete");
        }
        self.server.poll(&self.exports);
    }

    fn send(&mut self, bytes: &[u8]) {
        self.client.writer().write_all(bytes).expect("write");
        self.pump();
    }

    fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        let mut have = 0;
        while have < n {
            self.pump();
            match self.client.reader().read(&mut v[have..]) {
                Ok(0) => panic!("server closed after {have} of {n} bytes"),
                Ok(k) => have += k,
                Err(e) => panic!("only {have} of {n} bytes: {e}"),
            }
        }
        v
    }
}

#[test]
fn handshake_and_haggling_in_every_chunking() {
    for chunk in [1, 7, 300, 1 << 20] {
        let mut p = Pair::new(chunk);
        // STARTTLS again inside TLS: NBD_REP_ERR_INVALID, 19 bytes of text.
        p.send(&option(5, &[]));
        let r = p.recv(20 + 19);
        assert_eq!(&r[12..16], &0x8000_0003u32.to_be_bytes());
        assert_eq!(&r[20..], b"TLS already enabled");
        // NBD_OPT_EXPORT_NAME "disk" with no zeroes, then a 64 KiB read.
        p.send(&option(1, b"disk"));
        let r = p.recv(8 + 2 + 124);
        assert_eq!(&r[..8], &(1u64 << 20).to_be_bytes());
        let mut req = vec![0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0];
        req.extend_from_slice(&9u64.to_be_bytes());
        req.extend_from_slice(&4096u64.to_be_bytes());
        req.extend_from_slice(&65536u32.to_be_bytes());
        p.send(&req);
        let r = p.recv(16 + 65536);
        assert_eq!(&r[..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&r[8..16], &9u64.to_be_bytes());
        assert!(
            r[16..]
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (4096 + i as u64) as u8 ^ 0x5a),
            "chunk {chunk}"
        );
        // NBD_CMD_DISC: the server closes after its close_notify.
        let mut disc = vec![0x25, 0x60, 0x95, 0x13, 0, 0, 0, 2];
        disc.extend_from_slice(&[0; 20]);
        p.send(&disc);
        assert!(p.server.should_close(), "chunk {chunk}: {:?}", p.server);
        assert!(p.server.error().is_none());
    }
}

#[test]
fn input_is_bounded_while_the_engine_is_blocked() {
    let mut p = Pair::new(1 << 20);
    p.send(&option(1, b"disk"));
    let _ = p.recv(134);
    // 16 MiB of writes (4 times what the engine may hold) that the host
    // never completes: the engine stops
    // at its limits, and the TLS layer stops taking ciphertext.
    p.client.set_buffer_limit(None);
    let mut req = vec![0x25, 0x60, 0x95, 0x13, 0, 0, 0, 1];
    req.extend_from_slice(&1u64.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&65536u32.to_be_bytes());
    req.extend_from_slice(&[7; 65536]);
    for _ in 0..256 {
        p.client.writer().write_all(&req).expect("write");
    }
    let mut wire = Vec::new();
    while p.client.wants_write() {
        p.client.write_tls(&mut wire).expect("write_tls");
    }
    let mut taken = 0;
    loop {
        let n = p.server.receive(&wire[taken..], &p.exports);
        if n == 0 {
            break;
        }
        taken += n;
    }
    assert!(taken < wire.len() / 2, "took {taken} of {}", wire.len());
    assert!(p.server.tls_in.len() <= TLS_IN_MAX);
    assert!(p.server.plain_in.len() <= PLAIN_HIGH_WATER + RECORD);
    assert!(p.server.engine_ref().in_flight() > 0);
}

#[test]
fn garbage_after_starttls_fails_cleanly_in_every_chunking() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let exports = vec![Export::new("disk", 1 << 20)];
    for case in 0..200 {
        let mut s = TlsConnection::new(Limits::default(), creds());
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend_from_slice(&option(5, &[]));
        let len = (next() % 3000) as usize;
        // Half the cases look like a TLS handshake record.
        if case % 2 == 0 {
            input.extend_from_slice(&[0x16, 0x03, 0x01]);
        }
        input.extend((0..len).map(|_| next() as u8));
        let chunk = 1 + (next() % 64) as usize;
        let mut at = 0;
        while at < input.len() {
            let end = (at + chunk).min(input.len());
            let n = s.receive(&input[at..end], &exports);
            if n == 0 {
                break;
            }
            at += n;
        }
        assert!(!s.tls_active(), "case {case}");
        assert!(s.engine().next_request().is_none());
        let owed = s.output().len();
        s.consume_output(owed);
        if s.error().is_some() {
            assert!(s.should_close(), "case {case}");
        }
    }
}

#[test]
fn subject_distinguished_names_in_rfc_4514_form() {
    let der = |pem: &[u8]| {
        CertificateDer::pem_slice_iter(pem)
            .next()
            .expect("a certificate")
            .expect("PEM")
    };
    assert_eq!(subject_dn(&der(CERT)).as_deref(), Some("CN=localhost"));
    assert_eq!(
        subject_dn(&der(CA)).as_deref(),
        Some("CN=nbdtls unit-test CA")
    );
    // Truncated or foreign bytes: no name, never a panic.
    let cert = der(CERT);
    for n in 0..cert.len() {
        let _ = subject_dn(&cert[..n]);
    }
    assert_eq!(subject_dn(b"\x30\x03\x02\x01\x00"), None);
    // Escapes, multi-valued RDNs, unknown attribute types, in a
    // minimal certificate built here.
    fn t(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag, body.len() as u8];
        v.extend_from_slice(body);
        v
    }
    let ava = |oid: &[u8], tag: u8, value: &[u8]| t(0x30, &[t(0x06, oid), t(tag, value)].concat());
    let name = t(
        0x30,
        &[
            t(0x31, &ava(&[0x55, 0x04, 0x06], 0x13, b"X")),
            t(
                0x31,
                &[
                    ava(&[0x55, 0x04, 0x0a], 0x0c, b"a,b"),
                    ava(&[0x2a, 0x03], 0x0c, b"x"),
                ]
                .concat(),
            ),
            t(0x31, &ava(&[0x55, 0x04, 0x03], 0x0c, b" #lead")),
        ]
        .concat(),
    );
    let tbs = t(
        0x30,
        &[
            t(0xa0, &t(0x02, &[2])),
            t(0x02, &[1]),
            t(0x30, &[]),
            t(0x30, &[]),
            t(0x30, &[]),
            name,
        ]
        .concat(),
    );
    let cert = t(0x30, &tbs);
    assert_eq!(
        subject_dn(&cert).as_deref(),
        Some("CN=\\ #lead,O=a\\,b+1.2.3=#0c0178,C=X")
    );
}
