//! The command table (QEMU's `QmpCommandList`, `qapi/qmp-registry.c`).
//!
//! The kernel and the block layer register plain functions over their own
//! context type `C`; the [`Session`](super::Session) looks commands up here
//! and runs them with the context it is handed.

use alloc::vec::Vec;
use serde_json::Value;

use super::args::Args;
use super::error::QmpError;
use super::event::Event;

/// A command handler: validates its [`Args`], acts on the context, returns
/// the `"return"` value. `Value::Null` and `{}` both answer `{"return": {}}`
/// (QEMU supplies `{}` for commands without a return type).
pub type Handler<C> = fn(&mut C, &Args<'_>) -> Result<Value, QmpError>;

/// What a [`Session`](super::Session) needs from the context it runs
/// commands against. The method has a default, so `impl QmpContext for
/// Kernel {}` is enough to start.
pub trait QmpContext {
    /// Moves the events raised while the last command ran into `out`. The
    /// session writes them before the command's reply: QEMU emits events
    /// synchronously, so a client sees e.g. `JOB_STATUS_CHANGE` before the
    /// `{"return": {}}` of the command that caused it.
    fn drain_events(&mut self, out: &mut Vec<Event>) {
        let _ = out;
    }
}

/// A context with nothing to say: no events of its own.
impl QmpContext for () {}

/// A table of commands over context `C`.
pub struct Dispatcher<C> {
    commands: Vec<(&'static str, Handler<C>)>,
}

impl<C> Dispatcher<C> {
    /// An empty table.
    pub const fn new() -> Self {
        Dispatcher {
            commands: Vec::new(),
        }
    }

    /// Registers `handler` as `name`, replacing an earlier registration of
    /// the same name. A registered command takes precedence over a
    /// built-in of the same name, except `qmp_capabilities`.
    pub fn register(&mut self, name: &'static str, handler: Handler<C>) {
        if let Some(slot) = self.commands.iter_mut().find(|(n, _)| *n == name) {
            log::warn!("qmp: command {name} registered twice; keeping the last");
            slot.1 = handler;
        } else {
            self.commands.push((name, handler));
        }
    }

    /// Removes command `name`; returns whether it was registered.
    pub fn unregister(&mut self, name: &str) -> bool {
        let before = self.commands.len();
        self.commands.retain(|(n, _)| *n != name);
        self.commands.len() != before
    }

    /// The handler registered as `name`.
    pub fn get(&self, name: &str) -> Option<Handler<C>> {
        self.commands
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, h)| *h)
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The registered names, in registration order (built-ins excluded).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.commands.iter().map(|(n, _)| *n)
    }

    /// Number of registered commands.
    pub fn len(&self) -> usize {
        self.commands.len()
    }

    /// Whether no command is registered.
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }
}

impl<C> Default for Dispatcher<C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> core::fmt::Debug for Dispatcher<C> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}
