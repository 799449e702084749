//! NBD over TLS (`NBD_OPT_STARTTLS`), sans I/O, for the host tests and
//! the appliance alike.
//!
//! [`TlsConnection`] sits between the socket and the NBD engine
//! ([`block::nbd::Connection`], made with
//! [`Connection::new_tls_required`]): bytes from the socket in, bytes for
//! the socket out. Until the client's `NBD_OPT_STARTTLS` is acknowledged
//! both directions are plain text (and the engine refuses every other
//! option with `NBD_REP_ERR_TLS_REQD`); from the byte after that option
//! on, the input is a TLS stream that rustls decrypts for the engine, and
//! everything the engine says after its ACK is encrypted.
//!
//! rustls without `std` offers only its unbuffered API
//! ([`UnbufferedServerConnection`]); this module is the buffering around
//! it, with bounded memory: ciphertext is taken from the socket only while
//! the decrypted bytes the engine has not yet taken are few, so a client
//! that floods the server is pushed back on by TCP, as without TLS.
//!
//! Randomness comes from the RustCrypto provider's `OsRng` (the
//! `getrandom` crate: the appliance registers its RDRAND source), the
//! time for certificate validity from the [`TimeProvider`] given to
//! [`Credentials::from_pem`].

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

mod dn;
#[cfg(test)]
mod tests;

pub use dn::subject_dn;

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use block::nbd::{Connection, ExportSet, Limits};
use pki_types::pem::PemObject;
use pki_types::{CertificateDer, PrivateKeyDer};
use rustls::crypto::CryptoProvider;
use rustls::server::{
    ServerConfig, ServerConnectionData, UnbufferedServerConnection, WebPkiClientVerifier,
};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError};
use rustls::{RootCertStore, SignatureScheme};

pub use rustls::pki_types::UnixTime;
pub use rustls::time_provider::TimeProvider;

/// The TLS versions offered.
#[cfg(feature = "tls12")]
const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];
#[cfg(not(feature = "tls12"))]
const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// Decrypted input the engine has not taken, above which no more
/// ciphertext is taken from the socket.
const PLAIN_HIGH_WATER: usize = 64 * 1024;

/// Ciphertext buffered: a little more than one maximal TLS record.
const TLS_IN_MAX: usize = 16 * 1024 + 2048;

/// Application data encrypted per record.
const RECORD: usize = 16 * 1024;

/// Room for a record's header, padding and tag.
const RECORD_OVERHEAD: usize = 256;

/// Act on one state of rustls's unbuffered connection; whether anything
/// moved.
fn on_state(
    state: ConnectionState<'_, '_, ServerConnectionData>,
    nbd: &mut Connection,
    plain_in: &mut Vec<u8>,
    out: &mut Vec<u8>,
    peer_closed: &mut bool,
    close_notified: &mut bool,
) -> Result<bool, String> {
    let mut progress = false;
    match state {
        ConnectionState::ReadTraffic(mut r) => {
            while let Some(rec) = r.next_record() {
                let rec = rec.map_err(|e| format!("{e}"))?;
                plain_in.extend_from_slice(rec.payload);
            }
            progress = true;
        }
        ConnectionState::ReadEarlyData(mut r) => {
            // Never enabled (max_early_data_size is 0); drained if it
            // ever comes.
            while r.next_record().is_some() {}
            progress = true;
        }
        ConnectionState::EncodeTlsData(mut e) => {
            let mut room = 4096;
            loop {
                let at = out.len();
                out.resize(at + room, 0);
                match e.encode(&mut out[at..]) {
                    Ok(n) => {
                        out.truncate(at + n);
                        break;
                    }
                    Err(EncodeError::InsufficientSize(s)) => {
                        out.truncate(at);
                        room = s.required_size;
                    }
                    Err(EncodeError::AlreadyEncoded) => {
                        out.truncate(at);
                        break;
                    }
                }
            }
            progress = true;
        }
        // The records are in `out`, in order, for the host to send.
        ConnectionState::TransmitTlsData(t) => {
            t.done();
            progress = true;
        }
        ConnectionState::BlockedHandshake => {}
        ConnectionState::WriteTraffic(mut w) => {
            if !nbd.tls_active() {
                nbd.tls_started();
                progress = true;
            }
            loop {
                let chunk = nbd.output().chunk();
                if chunk.is_empty() {
                    break;
                }
                let n = chunk.len().min(RECORD);
                let at = out.len();
                out.resize(at + n + RECORD_OVERHEAD, 0);
                match w.encrypt(&chunk[..n], &mut out[at..]) {
                    Ok(len) => out.truncate(at + len),
                    Err(EncryptError::InsufficientSize(s)) => {
                        out.resize(at + s.required_size, 0);
                        let len = w
                            .encrypt(&chunk[..n], &mut out[at..])
                            .map_err(|e| format!("{e}"))?;
                        out.truncate(at + len);
                    }
                    Err(e) => return Err(format!("{e}")),
                }
                nbd.consume_output(n);
                progress = true;
            }
            if nbd.should_close() && !*close_notified {
                let at = out.len();
                out.resize(at + RECORD_OVERHEAD, 0);
                let len = w
                    .queue_close_notify(&mut out[at..])
                    .map_err(|e| format!("{e}"))?;
                out.truncate(at + len);
                *close_notified = true;
            }
        }
        ConnectionState::PeerClosed => {
            *peer_closed = true;
            progress = true;
        }
        ConnectionState::Closed => *peer_closed = true,
        _ => {}
    }
    Ok(progress)
}

/// Server credentials (QEMU's `tls-creds-x509` with `endpoint=server`).
#[derive(Clone)]
pub struct Credentials {
    config: Arc<ServerConfig>,
    verify_peer: bool,
    /// QEMU's `tls-authz` with `authz-simple`: the one client
    /// distinguished name admitted ([`subject_dn`]).
    authz: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("verify_peer", &self.verify_peer)
            .field("authz", &self.authz)
            .finish_non_exhaustive()
    }
}

/// Why credentials were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredsError(pub String);

impl fmt::Display for CredsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn certs(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CredsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CredsError(format!("Unable to parse {what}: {e:?}")))?;
    if certs.is_empty() {
        return Err(CredsError(format!("No certificate found in {what}")));
    }
    Ok(certs)
}

/// Whether ChaCha20-Poly1305 goes before AES-GCM. In the appliance the
/// crypto crates run their portable software backends (`.cargo/config.toml`),
/// where ChaCha20-Poly1305 is the faster cipher by far (AES and GHASH
/// without AES-NI and CLMUL are bit-sliced); every TLS 1.3 client offers
/// it (RFC 8446 §9.1 names it a SHOULD). Host builds keep the provider's
/// order and the client's choice.
const PREFER_CHACHA: bool = cfg!(target_os = "none");

/// RustCrypto's provider, ChaCha20-Poly1305 first where
/// [`PREFER_CHACHA`].
fn provider() -> CryptoProvider {
    let mut p = rustls_rustcrypto::provider();
    if PREFER_CHACHA {
        p.cipher_suites.sort_by_key(|s| {
            !matches!(
                s.suite(),
                rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
                    | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
                    | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
            )
        });
    }
    p
}

fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, CredsError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| CredsError(format!("Unable to parse the server key: {e:?}")))
}

/// The CA certificates clients' certificates must chain to.
fn roots(pem: &[u8]) -> Result<RootCertStore, CredsError> {
    let mut roots = RootCertStore::empty();
    for c in certs("the CA certificate", pem)? {
        roots
            .add(c)
            .map_err(|e| CredsError(format!("Unusable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// Whether `key` is the private key of `cert`: a signature made with it
/// must verify with the certificate's public key (the provider cannot
/// tell a key's public half, so rustls's own check does not run).
fn check_key_matches(
    provider: &CryptoProvider,
    cert: &CertificateDer<'_>,
    key: &PrivateKeyDer<'_>,
) -> Result<(), CredsError> {
    let unusable = |e: &dyn fmt::Display| CredsError(format!("Unusable server key: {e}"));
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| unusable(&e))?;
    let mapping = provider.signature_verification_algorithms.mapping;
    let schemes: Vec<SignatureScheme> = mapping.iter().map(|(s, _)| *s).collect();
    let signer = signing
        .choose_scheme(&schemes)
        .ok_or_else(|| unusable(&"no signature scheme"))?;
    let msg = b"blockhaus: does the key match the certificate?";
    let sig = signer.sign(msg).map_err(|e| unusable(&e))?;
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| CredsError(format!("Unusable server certificate: {e}")))?;
    let matches = mapping
        .iter()
        .filter(|(s, _)| *s == signer.scheme())
        .flat_map(|(_, algs)| algs.iter())
        .any(|alg| ee.verify_signature(*alg, msg, &sig).is_ok());
    if matches {
        Ok(())
    } else {
        Err(CredsError(String::from(
            "The server key does not match the server certificate",
        )))
    }
}

impl Credentials {
    /// Whether the PEM text can be read: the server's certificate chain,
    /// its key (in a form the provider can load) and, if given, the CA
    /// certificates. Needs no randomness, so it runs where the object is
    /// made; whether the key belongs to the certificate is checked by
    /// [`Credentials::from_pem`].
    pub fn check_pem(
        cert_chain: &[u8],
        key: &[u8],
        client_ca: Option<&[u8]>,
    ) -> Result<(), CredsError> {
        certs("the server certificate", cert_chain)?;
        provider()
            .key_provider
            .load_private_key(private_key(key)?)
            .map_err(|e| CredsError(format!("Unusable server key: {e}")))?;
        if let Some(ca) = client_ca {
            roots(ca)?;
        }
        Ok(())
    }

    /// Credentials from PEM text: the server's certificate chain (its
    /// own certificate first) and private key (PKCS#8, SEC1 or PKCS#1),
    /// and, to verify clients (QEMU's `verify-peer`), the CA certificates
    /// a client's certificate must chain to. TLS 1.3, and 1.2 with the
    /// `tls12` feature.
    pub fn from_pem(
        cert_chain: &[u8],
        key: &[u8],
        client_ca: Option<&[u8]>,
        time: Arc<dyn TimeProvider>,
    ) -> Result<Credentials, CredsError> {
        let chain = certs("the server certificate", cert_chain)?;
        let key = private_key(key)?;
        let provider = Arc::new(provider());
        check_key_matches(&provider, &chain[0], &key)?;
        let builder = ServerConfig::builder_with_details(provider.clone(), time)
            .with_protocol_versions(VERSIONS)
            .map_err(|e| CredsError(format!("TLS setup failed: {e}")))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider)
                        .build()
                        .map_err(|e| CredsError(format!("Unusable CA certificate: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| CredsError(format!("Unusable server certificate or key: {e}")))?;
        // The server's order of cipher suites wins (see `provider`).
        config.ignore_client_order = PREFER_CHACHA;
        Ok(Credentials {
            config: Arc::new(config),
            verify_peer: client_ca.is_some(),
            authz: None,
        })
    }

    /// Admits only the client whose certificate's subject is `identity`
    /// (RFC 4514, as [`subject_dn`] prints it: QEMU's `authz-simple`);
    /// refused unless clients are verified (QEMU would then skip the
    /// check and admit everyone).
    pub fn with_authz(mut self, identity: &str) -> Result<Credentials, CredsError> {
        if !self.verify_peer {
            return Err(CredsError(String::from(
                "tls-authz needs client certificates: set verify-peer=on",
            )));
        }
        self.authz = Some(identity.into());
        Ok(self)
    }

    /// Whether clients must present a certificate signed by the CA.
    pub fn verify_peer(&self) -> bool {
        self.verify_peer
    }
}

/// Why a TLS connection failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError(pub String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS: {}", self.0)
    }
}

/// One NBD client on a server that requires TLS.
pub struct TlsConnection {
    nbd: Connection,
    creds: Credentials,
    tls: Option<UnbufferedServerConnection>,
    /// Ciphertext received and not yet processed by rustls.
    tls_in: Vec<u8>,
    /// Decrypted input the engine has not taken yet.
    plain_in: Vec<u8>,
    /// Bytes for the socket.
    out: Vec<u8>,
    /// The client's close_notify arrived.
    peer_closed: bool,
    /// Our close_notify is queued.
    close_notified: bool,
    /// The authz check ran (once, when the handshake completed).
    authz_checked: bool,
    error: Option<TlsError>,
}

impl fmt::Debug for TlsConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConnection")
            .field("nbd", &self.nbd)
            .field("tls", &self.tls.is_some())
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl TlsConnection {
    /// A new connection; the NBD greeting is already queued.
    pub fn new(limits: Limits, creds: Credentials) -> TlsConnection {
        let mut c = TlsConnection {
            nbd: Connection::new_tls_required(limits),
            creds,
            tls: None,
            tls_in: Vec::new(),
            plain_in: Vec::new(),
            out: Vec::new(),
            peer_closed: false,
            close_notified: false,
            authz_checked: false,
            error: None,
        };
        c.take_plain_output();
        c
    }

    /// The NBD engine, for [`Connection::next_request`],
    /// [`Connection::complete`] and the rest; call
    /// [`TlsConnection::poll`] after completing requests.
    pub fn engine(&mut self) -> &mut Connection {
        &mut self.nbd
    }

    /// The NBD engine, read-only.
    pub fn engine_ref(&self) -> &Connection {
        &self.nbd
    }

    /// Whether the TLS handshake has completed.
    pub fn tls_active(&self) -> bool {
        self.nbd.tls_active()
    }

    /// Why TLS failed, if it did (the connection then closes, after the
    /// alert is sent).
    pub fn error(&self) -> Option<&TlsError> {
        self.error.as_ref()
    }

    /// Feed bytes from the socket; returns how many were taken (the rest
    /// stays in the socket: call again after sending output or completing
    /// requests). Never panics, whatever the bytes.
    pub fn receive(&mut self, input: &[u8], exports: &dyn ExportSet) -> usize {
        let mut used = 0;
        if self.tls.is_none() {
            used = self.nbd.receive(input, exports);
            self.take_plain_output();
            if !self.nbd.tls_pending() {
                return used;
            }
            match UnbufferedServerConnection::new(self.creds.config.clone()) {
                Ok(c) => self.tls = Some(c),
                Err(e) => {
                    self.fail(format!("cannot start: {e}"));
                    return input.len();
                }
            }
        }
        if self.error.is_some() || self.peer_closed {
            return input.len();
        }
        if self.plain_in.len() < PLAIN_HIGH_WATER {
            let n = (TLS_IN_MAX - self.tls_in.len().min(TLS_IN_MAX)).min(input.len() - used);
            self.tls_in.extend_from_slice(&input[used..used + n]);
            used += n;
        }
        self.poll(exports);
        used
    }

    /// Move what is pending between rustls and the engine: decrypted
    /// input into the engine, the engine's output into TLS records.
    pub fn poll(&mut self, exports: &dyn ExportSet) {
        if self.tls.is_none() {
            self.take_plain_output();
            return;
        }
        // Bounded: each round either makes progress or stops.
        for _ in 0..10_000 {
            // Before the engine sees a decrypted byte.
            if let Err(e) = self.check_authz() {
                self.fail(e);
                return;
            }
            if !self.plain_in.is_empty() {
                let n = self.nbd.receive(&self.plain_in, exports);
                self.plain_in.drain(..n);
            }
            match self.step() {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        }
    }

    /// Once the handshake is done: the client's certificate subject must
    /// be the credentials' authz identity, if they have one.
    fn check_authz(&mut self) -> Result<(), String> {
        if self.authz_checked {
            return Ok(());
        }
        let Some(tls) = self.tls.as_ref() else {
            return Ok(());
        };
        if tls.is_handshaking() {
            return Ok(());
        }
        self.authz_checked = true;
        let Some(identity) = &self.creds.authz else {
            return Ok(());
        };
        let dn = tls
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| subject_dn(c));
        if dn.as_deref() == Some(identity.as_str()) {
            Ok(())
        } else {
            Err(format!(
                "TLS x509 authz check for {} is denied",
                dn.as_deref().unwrap_or("(no certificate)")
            ))
        }
    }

    /// One turn of rustls's state machine; whether it made progress.
    fn step(&mut self) -> Result<bool, String> {
        let TlsConnection {
            nbd,
            tls,
            tls_in,
            plain_in,
            out,
            peer_closed,
            close_notified,
            ..
        } = self;
        let Some(tls) = tls.as_mut() else {
            return Ok(false);
        };
        let status = tls.process_tls_records(tls_in);
        let discard = status.discard;
        let result = match status.state {
            Ok(state) => on_state(state, nbd, plain_in, out, peer_closed, close_notified),
            Err(e) => Err(format!("{e}")),
        };
        // Whatever happened, rustls has consumed these bytes.
        tls_in.drain(..discard);
        result.map(|progress| progress || discard > 0)
    }

    /// TLS failed: queue the alert rustls has for the client, close.
    fn fail(&mut self, why: String) {
        log::warn!("nbd: TLS: {why}");
        if let Some(tls) = self.tls.as_mut() {
            let status = tls.process_tls_records(&mut self.tls_in);
            if let Ok(ConnectionState::EncodeTlsData(mut e)) = status.state {
                let at = self.out.len();
                self.out.resize(at + 512, 0);
                let n = e.encode(&mut self.out[at..]).unwrap_or(0);
                self.out.truncate(at + n);
            }
        }
        self.error = Some(TlsError(why));
        self.tls_in = Vec::new();
        self.plain_in = Vec::new();
    }

    /// Before the switch, the engine's output goes out as it is.
    fn take_plain_output(&mut self) {
        loop {
            let chunk = self.nbd.output().chunk();
            if chunk.is_empty() {
                return;
            }
            let n = chunk.len();
            self.out.extend_from_slice(chunk);
            self.nbd.consume_output(n);
        }
    }

    /// The bytes owed to the socket.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Mark `n` bytes of [`TlsConnection::output`] as sent.
    pub fn consume_output(&mut self, n: usize) {
        self.out.drain(..n.min(self.out.len()));
    }

    /// Whether the host should close the socket now: TLS failed, the
    /// client closed its TLS session, or the NBD engine is done, and
    /// everything owed has been sent.
    pub fn should_close(&self) -> bool {
        self.out.is_empty()
            && (self.error.is_some()
                || self.peer_closed
                || (self.nbd.should_close() && (self.tls.is_none() || self.close_notified)))
    }

    /// The peer went away (or the host closed the socket).
    pub fn closed(&mut self) {
        self.nbd.closed();
        self.out.clear();
        self.tls_in = Vec::new();
        self.plain_in = Vec::new();
    }
}
