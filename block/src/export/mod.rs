//! NBD exports of graph nodes (QEMU: `block/export/`, `blockdev-nbd.c`
//! and the export half of `nbd/server.c`): the platform-free policy the
//! appliance's NBD server applies, host-tested here.
//!
//! - [`table`]: the export table and each export's lifecycle (its
//!   anonymous backend, `shutting-down`, the reap that deletes it and emits
//!   `BLOCK_EXPORT_DELETED`, the legacy export that follows an eject);
//! - [`execute`]: one NBD request run on an export's backend;
//! - [`bitmaps`]: the `qemu:dirty-bitmap:*` and `qemu:allocation-depth`
//!   contexts an export offers;
//! - [`qmp`]: the NBD QMP commands and boot options, over the platform's
//!   listening sockets ([`NbdServer`]).
//!
//! The wire protocol itself is the sans-IO engine in [`crate::nbd`]; the
//! platform moves bytes between its TCP sockets and that engine and runs
//! [`execute`] for each request the engine issues.

pub mod bitmaps;
pub mod execute;
pub mod qmp;
pub mod table;

pub use execute::{Target, execute};
pub use qmp::{
    DEFAULT_HANDSHAKE_MAX_SECONDS, DEFAULT_MAX_CONNECTIONS, NbdContext, NbdServer, ServerConfig,
    apply_boot_option, register,
};
pub use table::{ExportTable, NbdExport, NewExport};
