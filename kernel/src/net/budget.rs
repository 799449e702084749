//! The memory the network and the NBD server may use, derived once at boot
//! from the heap actually present ([`crate::heap::Summary`]'s bytes), so an
//! appliance booted with `-m 24M` serves fewer clients with smaller
//! buffers instead of running out of heap (a failed allocation stops the
//! appliance: `no_std` cannot recover from one).
//!
//! With `H` the heap size:
//! - TCP buffers: RX and TX of each socket `H/64`, rounded down to a power
//!   of two, between 64 KiB and 1 MiB (1 MiB from a 64 MiB heap up);
//! - listening sockets (the backlog): `H/32 MiB`, between 2 and 8;
//! - clients served at once: `H/4 MiB`, between 2 and 24 (below
//!   `max-connections` when that is lower);
//! - read data all connections may hold (buffers of reads executing, read
//!   replies not yet taken): `H/4`, at most 64 MiB; one connection's
//!   share: half of that, at most 16 MiB;
//! - queued output a connection may hold before its input waits: its read
//!   share, at most 2 MiB; write payloads one connection may hold: `H/4`
//!   shared by the clients, between 256 KiB and 4 MiB;
//! - virtio-net frame buffers: receive and small transmit buffers `H/64`
//!   each (about 1.5 KiB a frame, at most one per ring slot); large
//!   (64 KiB) transmit buffers for segmentation offload `H/64`, between 2
//!   and 8; large receive buffers (64 KiB, instead of the small ones when
//!   the host may send 64 KiB frames) `H/32`, at most 8 (under 4 they are
//!   not used): at most about 1.4 MiB in all, so the heap at ready stays
//!   within 4 MiB;
//! - a reserve of `H/8` (at least 1 MiB) that a read or a write payload
//!   may not eat into: a request that would is answered `ENOMEM`.
//!
//! At the worst (every client at its limits) the sockets, reads and writes
//! take at most about 3/4 of the heap; the rest is the boot-time state,
//! the graph and the reserve.

use block::nbd::Limits;
use drivers::net::Sizing;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// A frame buffer at MTU 1500 (header and Ethernet frame, rounded up).
const FRAME: u64 = 1536;

/// The budgets of one appliance.
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    /// RX and TX buffer of each TCP socket, bytes each.
    pub socket_buffer: usize,
    /// Sockets kept listening.
    pub listeners: usize,
    /// Clients served at once.
    pub max_clients: usize,
    /// Read data all connections may hold.
    pub read_bytes: u64,
    /// Read data one connection may hold (a single read always may).
    pub conn_read_bytes: u64,
    /// The NBD engine's per-connection limits.
    pub limits: Limits,
    /// Heap a request's buffers must leave free.
    pub reserve: usize,
    /// virtio-net frame buffers.
    pub net: Sizing,
}

fn pow2_floor(n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        1 << (63 - n.leading_zeros())
    }
}

/// The smallest budgets, for a network not probed yet.
impl Default for Budgets {
    fn default() -> Budgets {
        Budgets::for_heap(0)
    }
}

impl Budgets {
    /// The budgets for a heap of `heap` bytes.
    pub fn for_heap(heap: u64) -> Budgets {
        let socket_buffer = pow2_floor(heap / 64).clamp(64 * KIB, MIB);
        let listeners = (heap / (32 * MIB)).clamp(2, 8);
        let max_clients = (heap / (4 * MIB)).clamp(2, 24);
        let read_bytes = (heap / 4).min(64 * MIB);
        let conn_read_bytes = (read_bytes / 2).min(16 * MIB);
        let limits = Limits {
            max_requests: 64,
            output_high_water: conn_read_bytes.min(2 * MIB),
            max_option_len: 16 * 1024,
            max_options: 1024,
            max_write_bytes: (heap / 4 / max_clients).clamp(256 * KIB, 4 * MIB),
        };
        Budgets {
            socket_buffer: socket_buffer as usize,
            listeners: listeners as usize,
            max_clients: max_clients as usize,
            read_bytes,
            conn_read_bytes,
            limits,
            reserve: (heap / 8).max(MIB) as usize,
            net: Sizing {
                rx_buffers: (heap / 64 / FRAME).max(16) as usize,
                rx_tso_buffers: (heap / 32 / (64 * KIB)).min(8) as usize,
                tx_buffers: (heap / 64 / FRAME).max(16) as usize,
                tso_buffers: (heap / 64 / (64 * KIB)).clamp(2, 8) as usize,
            },
        }
    }
}

impl core::fmt::Display for Budgets {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{} clients, {} listeners, {} KiB TCP buffers, reads {} KiB ({} KiB a client), writes {} KiB a client, reserve {} KiB, net buffers {} RX ({} of 64 KiB) {} TX ({} of 64 KiB)",
            self.max_clients,
            self.listeners,
            self.socket_buffer >> 10,
            self.read_bytes >> 10,
            self.conn_read_bytes >> 10,
            self.limits.max_write_bytes >> 10,
            self.reserve >> 10,
            self.net.rx_buffers,
            self.net.rx_tso_buffers,
            self.net.tx_buffers,
            self.net.tso_buffers
        )
    }
}
