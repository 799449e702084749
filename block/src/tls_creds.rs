//! `tls-creds-x509` (QEMU: `crypto/tlscredsx509.c`): X.509 credentials
//! for the NBD server's TLS, made by `object-add` / `--object` and named
//! by `nbd-server-start`'s `tls-creds`.
//!
//! QEMU reads `ca-cert.pem`, `server-cert.pem` and `server-key.pem` from
//! `dir`; the appliance booted with `-kernel` has no filesystem, so the
//! PEM text is given inline instead: `x-ca-cert`, `x-server-cert`,
//! `x-server-key` (a `dir` is refused, not ignored). The object holds
//! the text; `object-add` has the platform parse it
//! ([`crate::layer::BlockLayer::set_tls_creds_check`]) and fails, as
//! QEMU's does, when a certificate or the key cannot be read. The
//! platform makes the TLS configuration from it when `nbd-server-start`
//! names the object (and checks then that the key matches the
//! certificate: that takes a signature, so randomness).
//!
//! `authz-simple` (QEMU: `authz/simple.c`) names the one client admitted
//! by `nbd-server-start`'s `tls-authz`: its `identity` is compared with the
//! client certificate's distinguished name (RFC 4514, `CN=client,O=org`).
//! blockhaus reads it when the server starts (QEMU at each handshake).

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;

use crate::options::Opts;
use crate::qmp::QmpError;

/// The `qom-type`.
pub const QOM_TYPE: &str = "tls-creds-x509";

/// One `tls-creds-x509` object (always `endpoint=server`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsCredsX509 {
    /// QEMU's `verify-peer` (default on): clients must present a
    /// certificate signed by [`TlsCredsX509::ca_cert`].
    pub verify_peer: bool,
    /// PEM: the CA certificates a client's certificate must chain to.
    pub ca_cert: Option<String>,
    /// PEM: the server's certificate chain, its own certificate first.
    pub server_cert: String,
    /// PEM: the server's private key (PKCS#8, SEC1 or PKCS#1).
    pub server_key: String,
}

impl TlsCredsX509 {
    /// The object from `object-add`'s options (`qom-type` and `id` are
    /// read by the caller).
    pub fn parse(opts: &Opts<'_>) -> Result<TlsCredsX509, QmpError> {
        let endpoint = opts
            .opt_enum("endpoint", &["client", "server"])?
            .unwrap_or("client");
        let verify_peer = opts.bool_or("verify-peer", true)?;
        let dir = opts.opt_str("dir")?;
        let ca_cert = opts.opt_str("x-ca-cert")?;
        let server_cert = opts.opt_str("x-server-cert")?;
        let server_key = opts.opt_str("x-server-key")?;
        opts.check_unexpected()?;
        if endpoint != "server" {
            return Err(QmpError::generic(
                "blockhaus has no TLS client: tls-creds-x509 takes endpoint=server only",
            ));
        }
        if dir.is_some() {
            return Err(QmpError::generic(
                "blockhaus has no filesystem to read 'dir' from: give the PEM text inline \
                 with 'x-ca-cert', 'x-server-cert' and 'x-server-key'",
            ));
        }
        let missing = |name: &str| {
            QmpError::generic(format!(
                "Unable to access credentials: '{name}' (PEM text) is required"
            ))
        };
        let server_cert = server_cert.ok_or_else(|| missing("x-server-cert"))?;
        let server_key = server_key.ok_or_else(|| missing("x-server-key"))?;
        if verify_peer && ca_cert.is_none() {
            return Err(missing("x-ca-cert"));
        }
        Ok(TlsCredsX509 {
            verify_peer,
            ca_cert: ca_cert.map(String::from),
            server_cert: server_cert.into(),
            server_key: server_key.into(),
        })
    }
}

/// The `qom-type` of [`AuthzSimple`].
pub const AUTHZ_SIMPLE: &str = "authz-simple";

/// One `authz-simple` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzSimple {
    /// The client distinguished name admitted.
    pub identity: String,
}

impl AuthzSimple {
    /// The object from `object-add`'s options.
    pub fn parse(opts: &Opts<'_>) -> Result<AuthzSimple, QmpError> {
        let identity = opts.str("identity")?;
        opts.check_unexpected()?;
        Ok(AuthzSimple {
            identity: identity.into(),
        })
    }
}

/// The identity `tls-authz` names (QEMU: `qauthz_is_allowed_by_id`).
pub fn resolve_authz(reg: &crate::graph::registry::Registry, id: &str) -> Result<String, QmpError> {
    let Some(obj) = reg.object(id) else {
        return Err(QmpError::generic(format!(
            "Cannot find QAuthZ object ID {id}"
        )));
    };
    obj.downcast::<AuthzSimple>()
        .map(|a| a.identity.clone())
        .map_err(|_| QmpError::generic(format!("Object '{id}' is not a QAuthZ subclass")))
}

/// The credentials `tls-creds` names (QEMU: `nbd_get_tls_creds`), from
/// the registry's objects.
pub fn resolve(
    reg: &crate::graph::registry::Registry,
    id: &str,
) -> Result<Rc<TlsCredsX509>, QmpError> {
    let Some(obj) = reg.object(id) else {
        return Err(QmpError::generic(format!(
            "No TLS credentials with id '{id}'"
        )));
    };
    obj.downcast::<TlsCredsX509>()
        .map_err(|_| QmpError::generic(format!("Object with id '{id}' is not TLS credentials")))
}
