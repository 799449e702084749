//! TLS for the NBD server: the `tls-creds-x509` object named by
//! `nbd-server-start` turned into [`nbdtls::Credentials`], with the
//! appliance's wall clock for certificate validity and the CPU's random
//! source ([`crate::rng`]).

use alloc::string::String;
use alloc::sync::Arc;
use block::tls_creds::TlsCredsX509;
use core::time::Duration;
use nbdtls::{Credentials, TimeProvider, UnixTime};

/// The RTC-based wall clock QMP's timestamps use.
#[derive(Debug)]
struct WallClock;

impl TimeProvider for WallClock {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(Duration::from_nanos(
            crate::clock::wall_clock_ns(),
        )))
    }
}

/// `object-add`'s check of a `tls-creds-x509` object
/// ([`block::layer::BlockLayer::set_tls_creds_check`]): its PEM text
/// must parse.
pub fn check(creds: &TlsCredsX509) -> Result<(), String> {
    let ca = creds
        .verify_peer
        .then_some(creds.ca_cert.as_deref())
        .flatten();
    Credentials::check_pem(
        creds.server_cert.as_bytes(),
        creds.server_key.as_bytes(),
        ca.map(str::as_bytes),
    )
    .map_err(|e| e.0)
}

/// The server's credentials from the object's PEM text, admitting only
/// the client `authz` names if given; refused without a random source.
pub fn credentials(creds: &TlsCredsX509, authz: Option<&str>) -> Result<Credentials, String> {
    if !crate::rng::available() {
        return Err(crate::rng::NO_SOURCE.into());
    }
    let ca = if creds.verify_peer {
        creds.ca_cert.as_deref().map(str::as_bytes)
    } else {
        None
    };
    let c = Credentials::from_pem(
        creds.server_cert.as_bytes(),
        creds.server_key.as_bytes(),
        ca,
        Arc::new(WallClock),
    )
    .map_err(|e| e.0)?;
    let c = match authz {
        Some(identity) => c.with_authz(identity).map_err(|e| e.0)?,
        None => c,
    };
    log::info!(
        "nbd: TLS required ({} client certificates{}; random source {})",
        if c.verify_peer() {
            "verifying"
        } else {
            "not asking for"
        },
        match authz {
            Some(i) => alloc::format!(", admitting only {i}"),
            None => String::new(),
        },
        crate::rng::describe()
    );
    Ok(c)
}
