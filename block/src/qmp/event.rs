//! Asynchronous events (QEMU's `qapi_event_emit`, `monitor/monitor.c`).
//!
//! On the wire: `{"timestamp": {"seconds": S, "microseconds": U}, "event":
//! NAME, "data": {...}}`, members in QEMU's order; `data` is absent for
//! events without members (`STOP`, `RESUME`). A monitor still negotiating
//! capabilities receives no events.

use alloc::string::String;
use serde_json::{Map, Value};

/// When an event happened: wall-clock time since the Unix epoch
/// (`g_get_real_time()` in QEMU), split as QEMU splits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timestamp {
    /// Whole seconds.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Timestamp {
    /// A timestamp from microseconds since the epoch.
    pub const fn from_micros(us: i64) -> Self {
        Timestamp {
            seconds: us.div_euclid(1_000_000),
            microseconds: us.rem_euclid(1_000_000),
        }
    }
}

/// One event, ready to be sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event name, e.g. `BLOCK_JOB_COMPLETED`.
    pub name: String,
    /// The event's members, or `None` for an event without any.
    pub data: Option<Value>,
    /// When it happened.
    pub timestamp: Timestamp,
}

impl Event {
    /// An event.
    pub fn new(name: impl Into<String>, data: Option<Value>, timestamp: Timestamp) -> Self {
        Event {
            name: name.into(),
            data,
            timestamp,
        }
    }

    /// The event as the JSON object QEMU sends.
    pub fn to_value(&self) -> Value {
        let mut ts = Map::new();
        ts.insert("seconds".into(), self.timestamp.seconds.into());
        ts.insert("microseconds".into(), self.timestamp.microseconds.into());
        let mut obj = Map::new();
        obj.insert("event".into(), Value::String(self.name.clone()));
        if let Some(data) = &self.data {
            obj.insert("data".into(), data.clone());
        }
        obj.insert("timestamp".into(), Value::Object(ts));
        Value::Object(obj)
    }
}
