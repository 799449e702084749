//! The `ip=ADDR/PREFIX[,gw=GW]` kernel command-line setting.

use alloc::format;
use alloc::string::String;
use drivers::net::smoltcp::wire::Ipv4Address;

/// The interface's static IPv4 configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpConfig {
    pub addr: Ipv4Address,
    pub prefix: u8,
    pub gateway: Option<Ipv4Address>,
}

impl Default for IpConfig {
    /// QEMU's user network: 10.0.2.15/24 behind 10.0.2.2.
    fn default() -> Self {
        IpConfig {
            addr: Ipv4Address::new(10, 0, 2, 15),
            prefix: 24,
            gateway: Some(Ipv4Address::new(10, 0, 2, 2)),
        }
    }
}

fn addr(s: &str) -> Result<Ipv4Address, String> {
    s.parse()
        .map_err(|_| format!("ip=: '{s}' is not an IPv4 address"))
}

/// Parses `ADDR/PREFIX[,gw=GW]` (no gateway unless given; `None` gives the
/// QEMU user-network defaults).
pub fn parse(value: Option<&str>) -> Result<IpConfig, String> {
    let Some(value) = value else {
        return Ok(IpConfig::default());
    };
    let mut parts = value.split(',');
    let cidr = parts.next().unwrap_or("");
    let (a, p) = cidr.split_once('/').unwrap_or((cidr, "24"));
    let prefix: u8 = p
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("ip=: bad prefix length '{p}'"))?;
    let mut cfg = IpConfig {
        addr: addr(a)?,
        prefix,
        gateway: None,
    };
    for part in parts {
        match part.split_once('=') {
            Some(("gw", g)) => cfg.gateway = Some(addr(g)?),
            _ => return Err(format!("ip=: unknown setting '{part}'")),
        }
    }
    Ok(cfg)
}
