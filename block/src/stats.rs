//! I/O statistics (QEMU: `block/accounting.c`, `BlockAcctStats`, and
//! `query-blockstats` / `block-latency-histogram-set` in `block/qapi.c`
//! and `blockdev.c`).
//!
//! Every [`Backend`] counts the requests its user sends through it
//! ([`Backend::read`] and friends account themselves): per kind — read,
//! write (write-zeroes included, as QEMU's devices count it), flush, unmap
//! (discard) — bytes and operations that succeeded, operations that
//! failed, operations that were invalid (out of range), the total latency,
//! the time of the last request (for `idle_time_ns`), and optional latency
//! histograms. As in QEMU, a failed or invalid request also counts towards
//! the total time and the idle clock (`account_failed`, `account_invalid`,
//! both on); blockhaus merges no requests, so the `*_merged` counters stay
//! 0. `timed_stats` has one entry per interval set on the backend (QEMU:
//! `stats-intervals` of `-drive`, `block_acct_add_interval`; here the NBD
//! exports' `x-stats-intervals`), newest interval first as in QEMU: the
//! least, greatest and mean latency per kind and the mean queue depth over
//! the last interval, from two windows half an interval apart (QEMU's
//! `util/timed-average.c`): what is reported covers between half an
//! interval and a whole one.
//!
//! Nodes count only `wr_highest_offset` (QEMU's `bs->wr_highest_offset`).
//!
//! `query-blockstats` lists the backends a user can name: the named ones
//! (`device`) and the NBD exports' (blockhaus's devices: `qdev` is the
//! export's id), as QEMU lists the named backends and those attached to a
//! device. QEMU's own NBD server does no accounting; blockhaus counts its
//! exports' traffic because they are its only data path. With
//! `query-nodes: true` it lists every node instead.

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

use serde_json::{Map, Value, json};

use crate::graph::backend::Backend;
use crate::graph::node::Node;
use crate::layer::BlockLayer;
use crate::qmp::{Args, QmpError};

/// What a request counts as (QEMU: `enum BlockAcctType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcctType {
    /// A read.
    Read = 0,
    /// A write or write-zeroes.
    Write = 1,
    /// A flush.
    Flush = 2,
    /// A discard.
    Unmap = 3,
}

const KINDS: usize = 4;

/// A latency histogram (QEMU: `BlockLatencyHistogram`): `bins[i]` counts
/// the latencies in `[boundaries[i-1], boundaries[i])`, the first from 0,
/// the last to infinity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram {
    boundaries: Vec<u64>,
    bins: Vec<u64>,
}

impl Histogram {
    /// A histogram with `boundaries`, which must increase strictly.
    pub fn new(boundaries: &[u64]) -> Option<Histogram> {
        if boundaries.is_empty() || boundaries.windows(2).any(|w| w[0] >= w[1]) {
            return None;
        }
        Some(Histogram {
            boundaries: boundaries.to_vec(),
            bins: alloc::vec![0; boundaries.len() + 1],
        })
    }

    fn account(&mut self, latency_ns: u64) {
        let bin = self.boundaries.partition_point(|b| *b <= latency_ns);
        self.bins[bin] += 1;
    }

    fn to_value(&self) -> Value {
        json!({"boundaries": self.boundaries, "bins": self.bins})
    }
}

/// One window of a [`TimedAverage`].
#[derive(Debug, Clone, Copy)]
struct Window {
    min: u64,
    max: u64,
    sum: u64,
    count: u64,
    /// When the window starts afresh, ns.
    expires_ns: u64,
}

impl Window {
    fn new(expires_ns: u64) -> Self {
        Window {
            min: u64::MAX,
            max: 0,
            sum: 0,
            count: 0,
            expires_ns,
        }
    }
}

/// Least, greatest, mean and sum of values over the last `period` (QEMU:
/// `TimedAverage`): two windows, each reset every period, half a period
/// apart; the older one answers.
#[derive(Debug, Clone)]
struct TimedAverage {
    period_ns: u64,
    windows: [Window; 2],
}

impl TimedAverage {
    fn new(period_ns: u64, now_ns: u64) -> Self {
        TimedAverage {
            period_ns,
            windows: [
                Window::new(now_ns.saturating_add(period_ns / 2)),
                Window::new(now_ns.saturating_add(period_ns)),
            ],
        }
    }

    /// Resets the windows that expired; the older window and the time
    /// since it started.
    fn current(&mut self, now_ns: u64) -> (Window, u64) {
        for w in &mut self.windows {
            if w.expires_ns <= now_ns {
                // The next expiry on the window's own period grid.
                let late = (now_ns - w.expires_ns) % self.period_ns;
                *w = Window::new(now_ns + (self.period_ns - late));
            }
        }
        let older = if self.windows[0].expires_ns < self.windows[1].expires_ns {
            self.windows[0]
        } else {
            self.windows[1]
        };
        let elapsed = self.period_ns - older.expires_ns.saturating_sub(now_ns);
        (older, elapsed)
    }

    fn account(&mut self, value: u64, now_ns: u64) {
        self.current(now_ns);
        for w in &mut self.windows {
            w.count += 1;
            w.sum = w.sum.saturating_add(value);
            w.min = w.min.min(value);
            w.max = w.max.max(value);
        }
    }
}

/// The timed statistics of one interval (QEMU: `BlockAcctTimedStats`):
/// latencies of reads, writes and flushes.
#[derive(Debug, Clone)]
struct TimedStats {
    interval_s: u64,
    latency: [TimedAverage; 3],
}

impl TimedStats {
    fn report(&mut self, now_ns: u64) -> Value {
        let mut m = Map::new();
        m.insert("interval_length".into(), json!(self.interval_s));
        let mut sums = [(0u64, 0u64); 3];
        for (k, name) in ["rd", "wr", "flush"].iter().enumerate() {
            let (w, elapsed) = self.latency[k].current(now_ns);
            let min = if w.min == u64::MAX { 0 } else { w.min };
            let avg = w.sum.checked_div(w.count).unwrap_or(0);
            m.insert(format!("min_{name}_latency_ns"), json!(min));
            m.insert(format!("max_{name}_latency_ns"), json!(w.max));
            m.insert(format!("avg_{name}_latency_ns"), json!(avg));
            sums[k] = (w.sum, elapsed);
        }
        // Little's law: the time requests spent in flight over the time
        // elapsed is the mean number in flight.
        for (k, name) in [(0, "rd"), (1, "wr")] {
            let (sum, elapsed) = sums[k];
            let depth = if elapsed == 0 {
                0.0
            } else {
                sum as f64 / elapsed as f64
            };
            m.insert(format!("avg_{name}_queue_depth"), json!(depth));
        }
        Value::Object(m)
    }
}

#[derive(Debug, Default)]
struct Counters {
    bytes: [u64; KINDS],
    ops: [u64; KINDS],
    failed: [u64; KINDS],
    invalid: [u64; KINDS],
    total_time_ns: [u64; KINDS],
    histograms: [Option<Histogram>; KINDS],
    /// Newest interval first.
    timed: Vec<TimedStats>,
}

/// One backend's statistics (QEMU: `BlockAcctStats`).
#[derive(Debug, Default)]
pub struct BlockAcctStats {
    c: RefCell<Counters>,
    /// When the last accounted request ended; 0 before the first.
    last_access_ns: Cell<u64>,
}

impl BlockAcctStats {
    /// A request of `kind` over `bytes` that started at `start_ns` ended
    /// at `now_ns`, successfully or not (QEMU: `block_acct_done` /
    /// `block_acct_failed`).
    pub fn done(&self, kind: AcctType, bytes: u64, ok: bool, start_ns: u64, now_ns: u64) {
        let k = kind as usize;
        let latency = now_ns.saturating_sub(start_ns);
        let mut c = self.c.borrow_mut();
        if ok {
            c.bytes[k] += bytes;
            c.ops[k] += 1;
        } else {
            c.failed[k] += 1;
        }
        if let Some(h) = &mut c.histograms[k] {
            h.account(latency);
        }
        if kind != AcctType::Unmap {
            for t in &mut c.timed {
                t.latency[k].account(latency, now_ns);
            }
        }
        c.total_time_ns[k] += latency;
        self.last_access_ns.set(now_ns.max(1));
    }

    /// A request of `kind` refused as invalid (QEMU: `block_acct_invalid`).
    pub fn invalid(&self, kind: AcctType, now_ns: u64) {
        self.c.borrow_mut().invalid[kind as usize] += 1;
        self.last_access_ns.set(now_ns.max(1));
    }

    /// Adds the timed statistics of an interval of `seconds` (QEMU:
    /// `block_acct_add_interval`; 0 is refused by the caller).
    pub fn add_interval(&self, seconds: u64, now_ns: u64) {
        let period = seconds.saturating_mul(1_000_000_000).max(1);
        let avg = TimedAverage::new(period, now_ns);
        self.c.borrow_mut().timed.insert(
            0,
            TimedStats {
                interval_s: seconds,
                latency: [avg.clone(), avg.clone(), avg],
            },
        );
    }

    /// Sets (`Some`) or removes the histogram of `kind`.
    pub fn set_histogram(&self, kind: AcctType, h: Option<Histogram>) {
        self.c.borrow_mut().histograms[kind as usize] = h;
    }

    /// The counters as QEMU's `BlockDeviceStats` (less `wr_highest_offset`,
    /// a node's); `idle_time_ns` only once there was I/O.
    pub fn to_value(&self, now_ns: u64) -> Map<String, Value> {
        let mut c = self.c.borrow_mut();
        let timed: Vec<Value> = c.timed.iter_mut().map(|t| t.report(now_ns)).collect();
        let (r, w, f, u) = (0, 1, 2, 3);
        let mut m = zero_stats();
        for (name, v) in [
            ("rd_bytes", c.bytes[r]),
            ("wr_bytes", c.bytes[w]),
            ("unmap_bytes", c.bytes[u]),
            ("rd_operations", c.ops[r]),
            ("wr_operations", c.ops[w]),
            ("flush_operations", c.ops[f]),
            ("unmap_operations", c.ops[u]),
            ("rd_total_time_ns", c.total_time_ns[r]),
            ("wr_total_time_ns", c.total_time_ns[w]),
            ("flush_total_time_ns", c.total_time_ns[f]),
            ("unmap_total_time_ns", c.total_time_ns[u]),
            ("failed_rd_operations", c.failed[r]),
            ("failed_wr_operations", c.failed[w]),
            ("failed_flush_operations", c.failed[f]),
            ("failed_unmap_operations", c.failed[u]),
            ("invalid_rd_operations", c.invalid[r]),
            ("invalid_wr_operations", c.invalid[w]),
            ("invalid_flush_operations", c.invalid[f]),
            ("invalid_unmap_operations", c.invalid[u]),
        ] {
            m.insert(name.into(), json!(v));
        }
        m.insert("timed_stats".into(), Value::Array(timed));
        let last = self.last_access_ns.get();
        if last > 0 {
            m.insert("idle_time_ns".into(), json!(now_ns.saturating_sub(last)));
        }
        for (name, k) in [
            ("rd_latency_histogram", r),
            ("wr_latency_histogram", w),
            ("flush_latency_histogram", f),
        ] {
            if let Some(h) = &c.histograms[k] {
                m.insert(name.into(), h.to_value());
            }
        }
        m
    }
}

/// QEMU's `BlockDeviceStats` with every counter 0 (a node's, before
/// `wr_highest_offset`).
fn zero_stats() -> Map<String, Value> {
    let mut m = Map::new();
    for name in [
        "rd_bytes",
        "wr_bytes",
        "unmap_bytes",
        "rd_operations",
        "wr_operations",
        "flush_operations",
        "unmap_operations",
        "rd_total_time_ns",
        "wr_total_time_ns",
        "flush_total_time_ns",
        "unmap_total_time_ns",
        "wr_highest_offset",
        "rd_merged",
        "wr_merged",
        "unmap_merged",
        "failed_rd_operations",
        "failed_wr_operations",
        "failed_flush_operations",
        "failed_unmap_operations",
        "invalid_rd_operations",
        "invalid_wr_operations",
        "invalid_flush_operations",
        "invalid_unmap_operations",
    ] {
        m.insert(name.into(), json!(0));
    }
    m.insert("account_invalid".into(), json!(true));
    m.insert("account_failed".into(), json!(true));
    m.insert("timed_stats".into(), json!([]));
    m
}

/// The child whose statistics a node's entry nests as `parent` (QEMU:
/// `bdrv_primary_child`, else the one data-carrying child): `file` (or
/// blkdebug's `image`), else the only child that is not a backing file.
fn parent_child(node: &Node) -> Option<Rc<Node>> {
    let children = node.children();
    if let Some(c) = children
        .iter()
        .find(|c| matches!(c.name(), "file" | "image"))
    {
        return Some(c.node().clone());
    }
    let data: Vec<_> = children.iter().filter(|c| c.name() != "backing").collect();
    match data.as_slice() {
        [only] => Some(only.node().clone()),
        _ => None,
    }
}

/// A node's `BlockStats` (QEMU: `bdrv_query_bds_stats`); `backend_level`
/// also nests the backing chain, as QEMU does for a backend's entry.
fn node_stats(node: &Node, backend_level: bool) -> Map<String, Value> {
    let mut s = Map::new();
    s.insert("node-name".into(), json!(node.name()));
    let mut stats = zero_stats();
    stats.insert("wr_highest_offset".into(), json!(node.wr_highest_offset()));
    s.insert("stats".into(), Value::Object(stats));
    if let Some(p) = parent_child(node) {
        s.insert(
            "parent".into(),
            Value::Object(node_stats(&p, backend_level)),
        );
    }
    if backend_level && let Some(b) = node.children().iter().find(|c| c.name() == "backing") {
        s.insert(
            "backing".into(),
            Value::Object(node_stats(b.node(), backend_level)),
        );
    }
    s
}

/// A backend's `BlockStats`.
fn backend_stats(b: &Backend, now_ns: u64) -> Value {
    let mut s = match b.root_node() {
        Some(root) => node_stats(&root, true),
        None => {
            let mut s = Map::new();
            s.insert("stats".into(), Value::Object(zero_stats()));
            s
        }
    };
    s.insert("device".into(), json!(b.name().unwrap_or("")));
    if let Some(d) = b.device() {
        s.insert("qdev".into(), json!(d));
    }
    let wr_highest = s["stats"]["wr_highest_offset"].clone();
    let mut stats = zero_stats();
    stats.extend(b.stats().to_value(now_ns));
    stats.insert("wr_highest_offset".into(), wr_highest);
    s.insert("stats".into(), Value::Object(stats));
    Value::Object(s)
}

/// The backends `query-blockstats` lists: named, or used by a device.
fn listed(bl: &BlockLayer) -> Vec<Rc<Backend>> {
    bl.registry()
        .backends()
        .into_iter()
        .filter(|b| b.name().is_some() || b.device().is_some())
        .collect()
}

/// `query-blockstats`.
pub fn query_blockstats(bl: &BlockLayer, args: &Args<'_>) -> Result<Value, QmpError> {
    let query_nodes = args.opt_bool("query-nodes")?.unwrap_or(false);
    args.check_known(&["query-nodes"])?;
    let reg = bl.registry();
    let now = reg.clock().now_ns();
    Ok(Value::Array(if query_nodes {
        reg.nodes()
            .iter()
            .filter(|n| n.state() == crate::graph::node::NodeState::Open)
            .map(|n| Value::Object(node_stats(n, false)))
            .collect()
    } else {
        listed(bl).iter().map(|b| backend_stats(b, now)).collect()
    }))
}

/// `block-latency-histogram-set`: `id` names a backend (its name, or the
/// id of the export using it); `boundaries` applies to every kind the
/// specific lists do not override; no list at all removes the histograms.
pub fn block_latency_histogram_set(bl: &BlockLayer, args: &Args<'_>) -> Result<Value, QmpError> {
    let id = args.str("id")?;
    let list = |name: &str| -> Result<Option<Vec<u64>>, QmpError> {
        let Some(values) = args.opt_array(name)? else {
            return Ok(None);
        };
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                // As QEMU's visitor: a negative int wraps around.
                v.as_u64()
                    .or_else(|| v.as_i64().map(|i| i as u64))
                    .ok_or_else(|| {
                        QmpError::invalid_parameter_value(&args.element_name(name, i), "uint64")
                    })
            })
            .collect::<Result<Vec<u64>, QmpError>>()
            .map(Some)
    };
    let all = list("boundaries")?;
    let read = list("boundaries-read")?;
    let write = list("boundaries-write")?;
    let flush = list("boundaries-flush")?;
    args.check_known(&[
        "id",
        "boundaries",
        "boundaries-read",
        "boundaries-write",
        "boundaries-flush",
    ])?;
    let Some(b) = listed(bl)
        .into_iter()
        .find(|b| b.name() == Some(id) || b.device() == Some(id))
    else {
        return Err(QmpError::device_not_found(alloc::format!(
            "Device '{id}' not found"
        )));
    };
    let stats = b.stats();
    if all.is_none() && read.is_none() && write.is_none() && flush.is_none() {
        for k in [AcctType::Read, AcctType::Write, AcctType::Flush] {
            stats.set_histogram(k, None);
        }
        return Ok(json!({}));
    }
    for (kind, specific, what) in [
        (AcctType::Read, read, "read"),
        (AcctType::Write, write, "write"),
        (AcctType::Flush, flush, "flush"),
    ] {
        if let Some(bounds) = specific.as_ref().or(all.as_ref()) {
            let h = Histogram::new(bounds).ok_or_else(|| {
                QmpError::generic(alloc::format!("Device '{id}' set {what} boundaries fail"))
            })?;
            stats.set_histogram(kind, Some(h));
        }
    }
    Ok(json!({}))
}
