//! Throttle groups (QEMU: `block/throttle-groups.c`, `util/throttle.c`): the
//! `throttle-group` object that `object-add` creates and `throttle` nodes
//! share, with QEMU's leaky buckets.
//!
//! Each limit is a bucket that leaks at its average rate. A request may go
//! when every bucket it counts against is below its size (a tenth of a
//! second at the average rate, or `max × max-length` with a burst limit);
//! otherwise it sleeps until enough has leaked, on the executor's timers
//! and the platform's clock. Requests wait in arrival order, per direction,
//! across all nodes of the group.

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use core::cell::{Cell, RefCell};

use serde_json::{Map, Value, json};

use crate::exec::WaitQueue;
use crate::options::Opts;
use crate::qmp::QmpError;
use crate::timer::{Clock, TimerList};

/// QEMU's `THROTTLE_VALUE_MAX`.
pub const VALUE_MAX: u64 = 1_000_000_000_000_000;
const NS: f64 = 1e9;

/// Bucket indexes, as QEMU's `BucketType`.
const BPS_TOTAL: usize = 0;
const BPS_READ: usize = 1;
const BPS_WRITE: usize = 2;
const IOPS_TOTAL: usize = 3;
const IOPS_READ: usize = 4;
const IOPS_WRITE: usize = 5;
const NAMES: [&str; 6] = [
    "bps-total",
    "bps-read",
    "bps-write",
    "iops-total",
    "iops-read",
    "iops-write",
];

/// One leaky bucket (QEMU: `LeakyBucket`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Bucket {
    /// Average rate per second (0: unlimited).
    pub avg: u64,
    /// Burst rate per second (0: none).
    pub max: u64,
    /// Seconds a burst may last.
    pub burst_length: u64,
    level: f64,
    burst_level: f64,
}

impl Bucket {
    fn leak(&mut self, delta_ns: u64) {
        let leak = self.avg as f64 * delta_ns as f64 / NS;
        self.level = if self.level > leak {
            self.level - leak
        } else {
            0.0
        };
        if self.burst_length > 1 {
            let leak = self.max as f64 * delta_ns as f64 / NS;
            self.burst_level = if self.burst_level > leak {
                self.burst_level - leak
            } else {
                0.0
            };
        }
    }

    /// QEMU's `throttle_compute_wait`, in nanoseconds.
    fn wait_ns(&self) -> u64 {
        if self.avg == 0 {
            return 0;
        }
        let (bucket, burst) = if self.max == 0 {
            (self.avg as f64 / 10.0, 0.0)
        } else {
            (
                (self.max * self.burst_length) as f64,
                self.max as f64 / 10.0,
            )
        };
        let extra = self.level - bucket;
        if extra > 0.0 {
            return (extra / self.avg as f64 * NS) as u64 + 1;
        }
        if self.burst_length > 1 {
            let extra = self.burst_level - burst;
            if extra > 0.0 {
                return (extra / self.max as f64 * NS) as u64 + 1;
            }
        }
        0
    }

    fn account(&mut self, units: f64) {
        self.level += units;
        if self.burst_length > 1 {
            self.burst_level += units;
        }
    }
}

/// A group's limits (QEMU: `ThrottleConfig`, QAPI `ThrottleLimits`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThrottleConfig {
    /// The six buckets, in QEMU's `BucketType` order.
    pub buckets: [Bucket; 6],
    /// `iops-size`: larger requests count as several operations.
    pub op_size: u64,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        let b = Bucket {
            burst_length: 1,
            ..Default::default()
        };
        ThrottleConfig {
            buckets: [b; 6],
            op_size: 0,
        }
    }
}

impl ThrottleConfig {
    /// Reads a `limits` object (QAPI `ThrottleLimits`).
    pub fn parse(o: &Opts<'_>) -> Result<ThrottleConfig, QmpError> {
        let mut c = ThrottleConfig::default();
        for (i, name) in NAMES.iter().enumerate() {
            if let Some(v) = o.opt_i64(name)? {
                c.buckets[i].avg = clamp(v);
            }
            if let Some(v) = o.opt_i64(&format!("{name}-max"))? {
                c.buckets[i].max = clamp(v);
            }
            if let Some(v) = o.opt_i64(&format!("{name}-max-length"))? {
                c.buckets[i].burst_length = clamp(v);
            }
        }
        if let Some(v) = o.opt_i64("iops-size")? {
            c.op_size = clamp(v);
        }
        o.check_unexpected()?;
        c.validate()?;
        Ok(c)
    }

    /// QEMU's `throttle_is_valid`.
    pub fn validate(&self) -> Result<(), QmpError> {
        let b = &self.buckets;
        let both = |t: usize, r: usize, w: usize| b[t].avg != 0 && (b[r].avg != 0 || b[w].avg != 0);
        if both(BPS_TOTAL, BPS_READ, BPS_WRITE) || both(IOPS_TOTAL, IOPS_READ, IOPS_WRITE) {
            return Err(QmpError::generic(
                "bps/iops/max total values and read/write values cannot be used at the same time",
            ));
        }
        if b.iter().any(|x| x.max != 0 && x.avg == 0) {
            return Err(QmpError::generic(
                "bps_max/iops_max require corresponding bps/iops values",
            ));
        }
        for x in b {
            if x.avg > VALUE_MAX || x.max > VALUE_MAX {
                return Err(QmpError::generic(format!(
                    "bps/iops/max values must be within [0, {VALUE_MAX}]"
                )));
            }
            if x.burst_length == 0 {
                return Err(QmpError::generic("the burst length cannot be 0"));
            }
            if x.burst_length > 1 && x.max == 0 {
                return Err(QmpError::generic("burst length set without burst rate"));
            }
            if x.max != 0 && x.burst_length > VALUE_MAX / x.max {
                return Err(QmpError::generic(
                    "burst length too high for this burst rate",
                ));
            }
            if x.max != 0 && x.max < x.avg {
                return Err(QmpError::generic(
                    "bps_max/iops_max cannot be lower than bps/iops",
                ));
            }
        }
        Ok(())
    }

    /// The limits as QMP reports them.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        for (i, name) in NAMES.iter().enumerate() {
            let b = &self.buckets[i];
            m.insert((*name).into(), json!(b.avg));
            m.insert(format!("{name}-max"), json!(b.max));
            m.insert(format!("{name}-max-length"), json!(b.burst_length));
        }
        m.insert("iops-size".into(), json!(self.op_size));
        Value::Object(m)
    }
}

fn clamp(v: i64) -> u64 {
    if v < 0 { u64::MAX } else { v as u64 }
}

/// A `throttle-group` object.
pub struct ThrottleGroup {
    id: String,
    config: RefCell<ThrottleConfig>,
    last_leak: Cell<u64>,
    clock: Rc<dyn Clock>,
    timers: TimerList,
    members: Cell<u32>,
    tickets: [Cell<u64>; 2],
    serving: [Cell<u64>; 2],
    abandoned: [RefCell<alloc::vec::Vec<u64>>; 2],
    turn: WaitQueue,
}

/// A place in a direction's queue; giving it up (by completing, or by the
/// request future being dropped) lets the next request go.
struct Ticket<'a> {
    group: &'a ThrottleGroup,
    dir: usize,
    n: u64,
    done: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.group.abandoned[self.dir].borrow_mut().push(self.n);
        }
        self.group.advance(self.dir);
    }
}

impl ThrottleGroup {
    /// A group with `config`, timed by `clock` on `timers`.
    pub fn new(
        id: &str,
        config: ThrottleConfig,
        clock: Rc<dyn Clock>,
        timers: TimerList,
    ) -> ThrottleGroup {
        let now = clock.now_ns();
        ThrottleGroup {
            id: id.into(),
            config: RefCell::new(config),
            last_leak: Cell::new(now),
            clock,
            timers,
            members: Cell::new(0),
            tickets: [Cell::new(0), Cell::new(0)],
            serving: [Cell::new(0), Cell::new(0)],
            abandoned: [RefCell::default(), RefCell::default()],
            turn: WaitQueue::new(),
        }
    }

    /// The object id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The limits.
    pub fn config(&self) -> ThrottleConfig {
        *self.config.borrow()
    }

    /// How many throttle nodes use the group (QEMU: the object's refcount
    /// beyond the container's).
    pub fn members(&self) -> u32 {
        self.members.get()
    }

    pub(crate) fn join(&self) {
        self.members.set(self.members.get() + 1);
    }

    pub(crate) fn leave(&self) {
        self.members.set(self.members.get().saturating_sub(1));
    }

    fn leak(&self) {
        let now = self.clock.now_ns();
        let delta = now.saturating_sub(self.last_leak.get());
        self.last_leak.set(now);
        for b in self.config.borrow_mut().buckets.iter_mut() {
            b.leak(delta);
        }
    }

    fn buckets(write: bool) -> [usize; 4] {
        if write {
            [BPS_TOTAL, BPS_WRITE, IOPS_TOTAL, IOPS_WRITE]
        } else {
            [BPS_TOTAL, BPS_READ, IOPS_TOTAL, IOPS_READ]
        }
    }

    /// Moves the queue of direction `d` past finished and abandoned tickets.
    fn advance(&self, d: usize) {
        loop {
            let s = self.serving[d].get();
            let mut ab = self.abandoned[d].borrow_mut();
            if let Some(i) = ab.iter().position(|t| *t == s) {
                ab.swap_remove(i);
                self.serving[d].set(s + 1);
            } else {
                break;
            }
        }
        self.turn.wake_all();
    }

    /// Waits until a request of `bytes` in direction `write` may go, then
    /// accounts it (QEMU: `throttle_group_co_io_limits_intercept`).
    pub async fn intercept(&self, write: bool, bytes: u64) {
        let d = usize::from(write);
        let n = self.tickets[d].get();
        self.tickets[d].set(n + 1);
        let mut ticket = Ticket {
            group: self,
            dir: d,
            n,
            done: false,
        };
        self.turn.wait_until(|| self.serving[d].get() == n).await;
        loop {
            self.leak();
            let wait = {
                let c = self.config.borrow();
                Self::buckets(write)
                    .iter()
                    .map(|i| c.buckets[*i].wait_ns())
                    .max()
                    .unwrap_or(0)
            };
            if wait == 0 {
                break;
            }
            let deadline = self.clock.now_ns().saturating_add(wait);
            self.timers.sleep_until(self.clock.clone(), deadline).await;
        }
        {
            let mut c = self.config.borrow_mut();
            let ops = if c.op_size > 0 && bytes > c.op_size {
                bytes as f64 / c.op_size as f64
            } else {
                1.0
            };
            let [bps, bps_dir, iops, iops_dir] = Self::buckets(write);
            c.buckets[bps].account(bytes as f64);
            c.buckets[bps_dir].account(bytes as f64);
            c.buckets[iops].account(ops);
            c.buckets[iops_dir].account(ops);
        }
        ticket.done = true;
        self.serving[d].set(n + 1);
    }
}
