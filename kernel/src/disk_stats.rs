//! Per-disk I/O counters at the device level: what went to each disk's
//! virtqueue, whichever node sent it. Blocks' own statistics
//! (`query-blockstats`) count at the backends, as QEMU does; these are the
//! `iostat` view of the disks, in `x-query-devices`' `stats` with QEMU's
//! `BlockDeviceStats` member names.

use drivers::virtio::Op;
use serde_json::{Value, json};

/// What kind of request, for the counters and the trace points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Flush => "flush",
            Kind::Discard => "discard",
            Kind::WriteZeroes => "write-zeroes",
        }
    }
}

/// A request in flight: its kind, offset, length and start.
#[derive(Clone, Copy, Debug)]
pub struct Pending {
    pub kind: Kind,
    pub offset: u64,
    pub len: u64,
    pub start_ns: u64,
}

impl Pending {
    pub fn of(op: &Op, start_ns: u64) -> Pending {
        let (kind, offset, len) = match op {
            Op::Read { offset, buf } => (Kind::Read, *offset, buf.len() as u64),
            Op::Write { offset, buf, .. } => (Kind::Write, *offset, buf.len() as u64),
            Op::Flush => (Kind::Flush, 0, 0),
            Op::Discard { offset, len } => (Kind::Discard, *offset, *len),
            Op::WriteZeroes { offset, len, .. } => (Kind::WriteZeroes, *offset, *len),
        };
        Pending {
            kind,
            offset,
            len,
            start_ns,
        }
    }
}

/// One disk's counters since boot.
#[derive(Clone, Debug, Default)]
pub struct DiskStats {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub unmap_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    pub unmap_operations: u64,
    pub rd_total_time_ns: u64,
    pub wr_total_time_ns: u64,
    pub flush_total_time_ns: u64,
    pub unmap_total_time_ns: u64,
    /// Requests the device failed (any kind).
    pub failed_operations: u64,
}

impl DiskStats {
    /// Counts `p`, completed at `now_ns` (a failed request counts only as
    /// failed, as QEMU's `block_acct_failed`).
    pub fn account(&mut self, p: &Pending, ok: bool, now_ns: u64) {
        if !ok {
            self.failed_operations += 1;
            return;
        }
        let t = now_ns.saturating_sub(p.start_ns);
        let (bytes, ops, time) = match p.kind {
            Kind::Read => (
                &mut self.rd_bytes,
                &mut self.rd_operations,
                &mut self.rd_total_time_ns,
            ),
            Kind::Write | Kind::WriteZeroes => (
                &mut self.wr_bytes,
                &mut self.wr_operations,
                &mut self.wr_total_time_ns,
            ),
            Kind::Discard => (
                &mut self.unmap_bytes,
                &mut self.unmap_operations,
                &mut self.unmap_total_time_ns,
            ),
            Kind::Flush => {
                self.flush_operations += 1;
                self.flush_total_time_ns += t;
                return;
            }
        };
        *bytes += p.len;
        *ops += 1;
        *time += t;
    }

    pub fn to_json(&self) -> Value {
        json!({
            "rd_bytes": self.rd_bytes,
            "wr_bytes": self.wr_bytes,
            "unmap_bytes": self.unmap_bytes,
            "rd_operations": self.rd_operations,
            "wr_operations": self.wr_operations,
            "flush_operations": self.flush_operations,
            "unmap_operations": self.unmap_operations,
            "rd_total_time_ns": self.rd_total_time_ns,
            "wr_total_time_ns": self.wr_total_time_ns,
            "flush_total_time_ns": self.flush_total_time_ns,
            "unmap_total_time_ns": self.unmap_total_time_ns,
            "failed_operations": self.failed_operations,
        })
    }
}
