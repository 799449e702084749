//! QMP events raised by the block layer (QEMU: `qapi_event_send_*`).
//!
//! The block layer only names an event and its `data`; the QMP engine adds
//! the timestamp and puts it on the wire. The kernel implements
//! [`EventSink`] (or drains an [`EventQueue`]) to forward them.

use alloc::collections::VecDeque;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::RefCell;

use serde_json::Value;

/// Where events go.
pub trait EventSink {
    /// Emits event `name` with `data` (a JSON object).
    fn emit(&self, name: &str, data: Value);
}

/// Drops every event.
pub struct NoEvents;

impl EventSink for NoEvents {
    fn emit(&self, _: &str, _: Value) {}
}

/// Keeps events until drained.
#[derive(Default)]
pub struct EventQueue {
    queue: RefCell<VecDeque<(String, Value)>>,
}

impl EventQueue {
    /// An empty queue.
    pub fn new() -> EventQueue {
        EventQueue::default()
    }

    /// Takes every queued event, oldest first.
    pub fn drain(&self) -> Vec<(String, Value)> {
        self.queue.borrow_mut().drain(..).collect()
    }

    /// The names of the queued events, without taking them.
    pub fn names(&self) -> Vec<String> {
        self.queue.borrow().iter().map(|(n, _)| n.clone()).collect()
    }
}

impl EventSink for EventQueue {
    fn emit(&self, name: &str, data: Value) {
        self.queue.borrow_mut().push_back((name.to_string(), data));
    }
}
