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
use super::schema::Signature;

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

/// A table of commands over context `C`, with their
/// [signatures](Signature), the named types those use and the events the
/// context emits: everything `query-qmp-schema` reports.
pub struct Dispatcher<C> {
    commands: Vec<(&'static str, Signature, Handler<C>)>,
    types: Vec<(&'static str, &'static str)>,
    events: Vec<(&'static str, &'static str)>,
}

impl<C> Dispatcher<C> {
    /// An empty table.
    pub const fn new() -> Self {
        Dispatcher {
            commands: Vec::new(),
            types: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Registers `handler` as `name` with signature `sig`, replacing an
    /// earlier registration of the same name. A registered command takes
    /// precedence over a built-in of the same name, except
    /// `qmp_capabilities`. The session checks each call's arguments
    /// against `sig` before `handler` runs.
    pub fn register(&mut self, name: &'static str, sig: Signature, handler: Handler<C>) {
        if let Some(slot) = self.commands.iter_mut().find(|(n, _, _)| *n == name) {
            log::warn!("qmp: command {name} registered twice; keeping the last");
            slot.1 = sig;
            slot.2 = handler;
        } else {
            self.commands.push((name, sig, handler));
        }
    }

    /// Defines the named type `@name` for signatures (see
    /// [`schema`](super::schema)); a later definition replaces an earlier.
    pub fn register_type(&mut self, name: &'static str, spec: &'static str) {
        self.types.retain(|(n, _)| *n != name);
        self.types.push((name, spec));
    }

    /// Declares an event the context emits, with its data members.
    pub fn register_event(&mut self, name: &'static str, data: &'static str) {
        self.events.retain(|(n, _)| *n != name);
        self.events.push((name, data));
    }

    /// The named types.
    pub fn types(&self) -> &[(&'static str, &'static str)] {
        &self.types
    }

    /// The declared events and their data members.
    pub fn events(&self) -> &[(&'static str, &'static str)] {
        &self.events
    }

    /// Removes command `name`; returns whether it was registered.
    pub fn unregister(&mut self, name: &str) -> bool {
        let before = self.commands.len();
        self.commands.retain(|(n, _, _)| *n != name);
        self.commands.len() != before
    }

    /// The handler registered as `name`.
    pub fn get(&self, name: &str) -> Option<Handler<C>> {
        self.commands
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, _, h)| *h)
    }

    /// Runs registered command `name` on `ctx`: checks `args` against its
    /// signature (see [`schema::check_args`](super::schema::check_args)),
    /// then runs its handler. `None` if `name` is not registered.
    pub fn call(
        &self,
        name: &str,
        ctx: &mut C,
        args: &Args<'_>,
    ) -> Option<Result<Value, QmpError>> {
        let (_, sig, handler) = self.commands.iter().find(|(n, _, _)| *n == name)?;
        Some(super::schema::check_args(sig.args, args).and_then(|()| handler(ctx, args)))
    }

    /// The signature of registered command `name`.
    pub fn signature(&self, name: &str) -> Option<Signature> {
        self.commands
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, s, _)| *s)
    }

    /// Every registered command with its signature, in registration order.
    pub fn signatures(&self) -> impl Iterator<Item = (&'static str, Signature)> + '_ {
        self.commands.iter().map(|(n, s, _)| (*n, *s))
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The registered names, in registration order (built-ins excluded).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.commands.iter().map(|(n, _, _)| *n)
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
