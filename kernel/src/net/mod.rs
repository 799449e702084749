//! Networking and the NBD server (issue 5). Placeholder: no network yet.
//!
//! Hooks the rest of the kernel calls (keep these signatures):
//! - [`Network::probe`] at boot, with the `ip=` setting of the command line;
//! - [`Network::poll`] from the main loop and from the block layer's
//!   platform while a QMP command waits (returns whether anything happened);
//! - [`apply_boot_option`] for `--nbd-server` / `--export`;
//! - [`register`] for the QMP commands;
//! - [`Network::close_exports`] first in the halt path, before close-all.

use crate::monitor::Appliance;
use alloc::rc::Rc;
use block::qmp::Dispatcher;
use block::registry::Registry;

/// The network stack and the NBD server.
#[derive(Default)]
pub struct Network {}

impl Network {
    /// Finds a virtio-net device and brings the interface up; `ip` is the
    /// command line's `ip=ADDR/PREFIX[,gw=GW]` (QEMU user-network defaults
    /// when absent).
    pub fn probe(
        _ip: Option<&str>,
        _registry: Rc<Registry>,
    ) -> Result<Self, alloc::string::String> {
        Ok(Self {})
    }

    /// Moves frames, runs TCP, serves NBD connections (spawning their tasks
    /// on the registry's executor). Returns whether anything happened.
    pub fn poll(&mut self) -> bool {
        false
    }

    /// Halt path: closes every export (each emits `BLOCK_EXPORT_DELETED`)
    /// and lets in-flight requests finish.
    pub fn close_exports(&mut self) {}
}

/// `--nbd-server` and `--export`: `Ok(true)` when applied, `Ok(false)` when
/// the option is not a network one.
pub fn apply_boot_option(
    _app: &mut Appliance,
    _name: &str,
    _value: &str,
) -> Result<bool, alloc::string::String> {
    Ok(false)
}

/// Registers the NBD QMP commands.
pub fn register(_commands: &mut Dispatcher<Appliance>) {}
