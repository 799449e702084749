//! A certificate's subject as the distinguished-name string QEMU's
//! `authz-simple` compares with its `identity`: RFC 4514, as GnuTLS's
//! `gnutls_x509_crt_get_dn3` prints it (and `openssl x509 -subject
//! -nameopt RFC2253`): the last RDN first, `CN=client,O=blockhaus`.
//!
//! A small DER reader (tag, length, contents) is enough: the certificate
//! has already been verified by webpki when this runs; anything it cannot
//! read gives `None`, and the client is refused.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// One TLV: (tag, contents, what follows).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The contents of a TLV with `tag`, and what follows.
fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, body, rest) = tlv(input)?;
    (t == tag).then_some((body, rest))
}

/// The subject Name of a DER certificate, as its DER contents.
fn subject(cert: &[u8]) -> Option<&[u8]> {
    let (cert, _) = expect(cert, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let mut rest = tbs;
    // [0] EXPLICIT version, when present.
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.2;
    }
    // serialNumber, signature, issuer, validity, then subject.
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    expect(rest, SEQUENCE).map(|(name, _)| name)
}

/// The short names RFC 4514 (and GnuTLS) use.
fn short_name(oid: &[u8]) -> Option<&'static str> {
    Some(match oid {
        [0x55, 0x04, 0x03] => "CN",
        [0x55, 0x04, 0x06] => "C",
        [0x55, 0x04, 0x07] => "L",
        [0x55, 0x04, 0x08] => "ST",
        [0x55, 0x04, 0x09] => "STREET",
        [0x55, 0x04, 0x0a] => "O",
        [0x55, 0x04, 0x0b] => "OU",
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => "DC",
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01] => "UID",
        _ => return None,
    })
}

/// An OID in dotted decimal.
fn dotted(oid: &[u8]) -> Option<String> {
    let (&first, rest) = oid.split_first()?;
    let mut s = format!("{}.{}", first / 40, first % 40);
    let mut v: u64 = 0;
    for &b in rest {
        v = v.checked_mul(128)? | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            let _ = write!(s, ".{v}");
            v = 0;
        }
    }
    Some(s)
}

/// A string value with RFC 4514's escapes.
fn escaped(value: &str, out: &mut String) {
    let n = value.chars().count();
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == n && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
}

/// One AttributeTypeAndValue, `TYPE=value`.
fn ava(der: &[u8], out: &mut String) -> Option<()> {
    let (oid, rest) = expect(der, OID)?;
    let (tag, value, _) = tlv(rest)?;
    let text = match tag {
        // UTF8String, PrintableString, IA5String.
        0x0c | 0x13 | 0x16 => core::str::from_utf8(value).ok(),
        _ => None,
    };
    match (short_name(oid), text) {
        (Some(name), Some(t)) => {
            out.push_str(name);
            out.push('=');
            escaped(t, out);
        }
        // RFC 4514: the dotted OID and the DER value in hex.
        (name, _) => {
            match name {
                Some(n) => out.push_str(n),
                None => out.push_str(&dotted(oid)?),
            }
            out.push_str("=#");
            let whole = &rest[..rest.len() - tlv(rest)?.2.len()];
            for b in whole {
                let _ = write!(out, "{b:02x}");
            }
        }
    }
    Some(())
}

/// The certificate's subject in RFC 4514 form; `None` if it cannot be
/// read.
pub fn subject_dn(cert: &[u8]) -> Option<String> {
    let mut rdns: Vec<String> = Vec::new();
    let mut rest = subject(cert)?;
    while !rest.is_empty() {
        let (set, next) = expect(rest, SET)?;
        let mut rdn = String::new();
        let mut avas = set;
        while !avas.is_empty() {
            let (one, more) = expect(avas, SEQUENCE)?;
            if !rdn.is_empty() {
                rdn.push('+');
            }
            ava(one, &mut rdn)?;
            avas = more;
        }
        rdns.push(rdn);
        rest = next;
    }
    rdns.reverse();
    Some(rdns.join(","))
}
