//! One QMP connection, sans I/O (QEMU's `MonitorQMP`, `monitor/qmp.c`).
//!
//! The kernel owns the byte transport (a serial port). It writes
//! [`Session::greeting`] when a client connects, hands every received chunk
//! to [`Session::feed`] together with the command table and its context,
//! queues events with [`Session::event`], and writes out whatever
//! [`Session::take_output`] returns. Every message ends in `\r\n` (QEMU's
//! `monitor_puts` turns `\n` into `\r\n`).
//!
//! Requests are checked as `qmp_dispatch()` checks them, in this order:
//!
//! 1. not an object: "QMP input must be a JSON object" (no `id`);
//! 2. members, in QEMU's `QDict` order: `execute` (and `exec-oob` once OOB
//!    is enabled) must be a string ("QMP input member 'execute' must be a
//!    string"), not both ("... clashes with ..."), `arguments` an object
//!    ("QMP input member 'arguments' must be an object"), `id` anything,
//!    nothing else ("QMP input member 'X' is unexpected"); then "QMP input
//!    lacks member 'execute'";
//! 3. unknown command: `CommandNotFound`, "The command X has not been
//!    found" — before capabilities negotiation, every command but
//!    `qmp_capabilities` is unknown and the text becomes "Expecting
//!    capabilities negotiation with 'qmp_capabilities'";
//! 4. `exec-oob`: "The command X does not support OOB" (none does);
//! 5. the handler, with `arguments` or `{}`.
//!
//! Every reply from step 2 on echoes the request's `id`, whatever its type.
//!
//! OOB: the greeting offers `"oob"` (QEMU does on a monitor with an I/O
//! thread) and `qmp_capabilities` accepts `{"enable": ["oob"]}`; that only
//! makes `exec-oob` a known member, since no blockhaus command may run out
//! of band. Commands run one at a time, in order, as QEMU runs in-band
//! commands.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use serde_json::{Map, Value};

use super::args::Args;
use super::builtins::{self, Builtin, VersionInfo};
use super::dispatch::{Dispatcher, QmpContext};
use super::error::{ErrorClass, QmpError};
use super::event::{Event, Timestamp};
use super::json::{JsonStream, Limits, drop_value, qdict_order, write_str, write_value};

/// What the kernel must do after [`Session::feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Action {
    /// Keep serving.
    Continue,
    /// `quit` was executed: write out the pending output (its `{"return":
    /// {}}` included), then shut down. Input after `quit` is dropped.
    Quit,
}

/// One QMP client connection.
#[derive(Debug)]
pub struct Session {
    version: VersionInfo,
    offer_oob: bool,
    stream: JsonStream,
    negotiated: bool,
    oob: bool,
    out: Vec<u8>,
}

impl Session {
    /// A session claiming `version`, offering OOB, with QEMU's JSON limits.
    pub fn new(version: VersionInfo) -> Self {
        Session {
            version,
            offer_oob: true,
            stream: JsonStream::new(),
            negotiated: false,
            oob: false,
            out: Vec::new(),
        }
    }

    /// Replaces the JSON limits (QEMU's are generous for a small heap:
    /// 64 MiB and 2 Mi tokens per message, nesting 1024). Resets the parser.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.stream = JsonStream::with_limits(limits);
        self
    }

    /// Whether the greeting offers the `oob` capability (default: yes).
    pub fn with_oob_offered(mut self, offer: bool) -> Self {
        self.offer_oob = offer;
        self
    }

    /// The version reported by the greeting and `query-version`.
    pub fn version(&self) -> &VersionInfo {
        &self.version
    }

    /// The greeting to send when a client connects:
    /// `{"QMP": {"version": {...}, "capabilities": ["oob"]}}` + `\r\n`.
    pub fn greeting(&self) -> Vec<u8> {
        let caps: Vec<Value> = if self.offer_oob {
            alloc::vec![Value::from("oob")]
        } else {
            Vec::new()
        };
        let mut qmp = Map::new();
        qmp.insert("version".into(), self.version.to_value());
        qmp.insert("capabilities".into(), Value::Array(caps));
        let mut greeting = Map::new();
        greeting.insert("QMP".into(), Value::Object(qmp));
        let mut out = Vec::new();
        write_value(&mut out, &Value::Object(greeting));
        out.extend_from_slice(b"\r\n");
        out
    }

    /// Back to a fresh connection: capabilities not negotiated, OOB off,
    /// partial input and unsent output dropped (QEMU on `CHR_EVENT_CLOSED`
    /// then `CHR_EVENT_OPENED`). Send [`greeting`](Self::greeting) next.
    pub fn reset(&mut self) {
        self.stream.reset();
        self.negotiated = false;
        self.oob = false;
        self.out.clear();
    }

    /// Whether `qmp_capabilities` has succeeded.
    pub fn is_negotiated(&self) -> bool {
        self.negotiated
    }

    /// Whether the client enabled OOB.
    pub fn oob_enabled(&self) -> bool {
        self.oob
    }

    /// Takes the bytes to send.
    pub fn take_output(&mut self) -> Vec<u8> {
        core::mem::take(&mut self.out)
    }

    /// The bytes waiting to be sent.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Whether complete requests wait to be run
    /// ([`feed_within`](Self::feed_within)).
    pub fn has_queued(&self) -> bool {
        self.stream.has_ready()
    }

    /// Whether bytes wait to be sent.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Feeds received bytes, split anywhere, and runs every request they
    /// complete, in order, against `dispatcher` and `ctx`. Replies, parse
    /// errors and the events the commands raise accumulate in the output.
    pub fn feed<C: QmpContext>(
        &mut self,
        input: &[u8],
        dispatcher: &Dispatcher<C>,
        ctx: &mut C,
    ) -> Action {
        self.feed_within(input, dispatcher, ctx, usize::MAX)
    }

    /// [`feed`](Self::feed), but requests run only while fewer than
    /// `budget` bytes of output wait: the rest stay queued
    /// ([`has_queued`](Self::has_queued)) for a later call, which may
    /// bring no input. Flow control for a client that does not read its
    /// replies: its transport holds the input back meanwhile.
    pub fn feed_within<C: QmpContext>(
        &mut self,
        input: &[u8],
        dispatcher: &Dispatcher<C>,
        ctx: &mut C,
        budget: usize,
    ) -> Action {
        self.stream.feed(input);
        while self.out.len() < budget
            && let Some(item) = self.stream.pop()
        {
            match item {
                Ok(request) => {
                    if self.handle(request, dispatcher, ctx) == Action::Quit {
                        self.stream.discard_ready();
                        return Action::Quit;
                    }
                }
                Err(desc) => self.write_error(None, &QmpError::generic(desc)),
            }
        }
        Action::Continue
    }

    /// Queues an event. Returns `false`, dropping it, while capabilities
    /// are not negotiated (QEMU sends no events then).
    pub fn event(&mut self, name: &str, data: Option<Value>, timestamp: Timestamp) -> bool {
        let sent = self.negotiated;
        if sent {
            self.write_event(name, data.as_ref(), timestamp);
        }
        if let Some(data) = data {
            drop_value(data);
        }
        sent
    }

    /// Queues `event`; see [`event`](Self::event).
    pub fn emit(&mut self, event: &Event) -> bool {
        if self.negotiated {
            self.write_event(&event.name, event.data.as_ref(), event.timestamp);
        }
        self.negotiated
    }

    fn handle<C: QmpContext>(&mut self, request: Value, d: &Dispatcher<C>, ctx: &mut C) -> Action {
        let mut obj = match request {
            Value::Object(obj) => obj,
            other => {
                drop_value(other);
                self.write_error(None, &QmpError::generic("QMP input must be a JSON object"));
                return Action::Continue;
            }
        };
        let id = obj.remove("id");
        let mut action = Action::Continue;
        let result = match self.check_request(&obj) {
            Err(e) => Err(e),
            Ok((name, oob)) => {
                let empty = Map::new();
                let args = match obj.get("arguments") {
                    Some(Value::Object(map)) => Args::new(map),
                    _ => Args::new(&empty),
                };
                let (result, act) = self.run(name, oob, &args, d, ctx);
                action = act;
                result
            }
        };
        // Events raised by the command go out before its reply.
        let mut events = Vec::new();
        ctx.drain_events(&mut events);
        for event in events {
            self.emit(&event);
            if let Some(data) = event.data {
                drop_value(data);
            }
        }
        match result {
            Ok(value) => {
                self.write_return(id.as_ref(), &value);
                drop_value(value);
            }
            Err(mut e) => {
                if !self.negotiated && e.class == ErrorClass::CommandNotFound {
                    e.desc = "Expecting capabilities negotiation with 'qmp_capabilities'".into();
                }
                self.write_error(id.as_ref(), &e);
            }
        }
        if let Some(id) = id {
            drop_value(id);
        }
        drop_value(Value::Object(obj));
        action
    }

    /// `qmp_dispatch_check_obj()`: returns the command name and whether it
    /// came as `exec-oob`.
    fn check_request<'r>(&self, obj: &'r Map<String, Value>) -> Result<(&'r str, bool), QmpError> {
        let mut exec: Option<(&str, &'r str)> = None;
        for (key, value) in qdict_order(obj) {
            match key {
                "execute" | "exec-oob" if key == "execute" || self.oob => {
                    let Some(name) = value.as_str() else {
                        return Err(QmpError::generic(format!(
                            "QMP input member '{key}' must be a string"
                        )));
                    };
                    if let Some((prev, _)) = exec {
                        return Err(QmpError::generic(format!(
                            "QMP input member '{key}' clashes with '{prev}'"
                        )));
                    }
                    exec = Some((key, name));
                }
                "arguments" if !value.is_object() => {
                    return Err(QmpError::generic(
                        "QMP input member 'arguments' must be an object",
                    ));
                }
                "arguments" | "id" => {}
                _ => {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{key}' is unexpected"
                    )));
                }
            }
        }
        match exec {
            Some((key, name)) => Ok((name, key == "exec-oob")),
            None => Err(QmpError::generic("QMP input lacks member 'execute'")),
        }
    }

    fn run<C: QmpContext>(
        &mut self,
        name: &str,
        oob: bool,
        args: &Args<'_>,
        d: &Dispatcher<C>,
        ctx: &mut C,
    ) -> (Result<Value, QmpError>, Action) {
        let not_found =
            || QmpError::command_not_found(format!("The command {name} has not been found"));
        let handler = name != "qmp_capabilities" && d.contains(name);
        let builtin = Builtin::lookup(name);
        if !self.negotiated && name != "qmp_capabilities" {
            return (Err(not_found()), Action::Continue);
        }
        if !handler && builtin.is_none() {
            return (Err(not_found()), Action::Continue);
        }
        if oob {
            return (
                Err(QmpError::generic(format!(
                    "The command {name} does not support OOB"
                ))),
                Action::Continue,
            );
        }
        log::debug!("qmp: {name}");
        let mut action = Action::Continue;
        let result = match (handler, builtin) {
            (true, _) => d.call(name, ctx, args).unwrap_or_else(|| Err(not_found())),
            (false, Some(Builtin::Capabilities)) => {
                builtins::qmp_capabilities(args, self.negotiated, self.offer_oob).map(|oob| {
                    self.negotiated = true;
                    self.oob = oob;
                    Value::Null
                })
            }
            (false, Some(Builtin::QueryVersion)) => builtins::query_version(args, &self.version),
            (false, Some(Builtin::QueryCommands)) => builtins::query_commands(args, d.names()),
            (false, Some(Builtin::QueryStatus)) => builtins::query_status(args),
            (false, Some(Builtin::QuerySchema)) => builtins::query_qmp_schema(args, d),
            (false, Some(Builtin::Quit)) => {
                let result = builtins::quit(args);
                if result.is_ok() {
                    action = Action::Quit;
                }
                result
            }
            (false, None) => Err(not_found()),
        };
        (result, action)
    }

    fn write_return(&mut self, id: Option<&Value>, value: &Value) {
        // {"return": ..., "id": ...}: QEMU's QDict order.
        self.out.extend_from_slice(b"{\"return\": ");
        match value {
            Value::Null => self.out.extend_from_slice(b"{}"),
            value => write_value(&mut self.out, value),
        }
        if let Some(id) = id {
            self.out.extend_from_slice(b", \"id\": ");
            write_value(&mut self.out, id);
        }
        self.out.extend_from_slice(b"}\r\n");
    }

    fn write_error(&mut self, id: Option<&Value>, error: &QmpError) {
        // {"id": ..., "error": {"class": ..., "desc": ...}}: QEMU's order.
        self.out.push(b'{');
        if let Some(id) = id {
            self.out.extend_from_slice(b"\"id\": ");
            write_value(&mut self.out, id);
            self.out.extend_from_slice(b", ");
        }
        self.out.extend_from_slice(b"\"error\": {\"class\": ");
        write_str(&mut self.out, error.class.as_str());
        self.out.extend_from_slice(b", \"desc\": ");
        write_str(&mut self.out, &error.desc);
        self.out.extend_from_slice(b"}}\r\n");
    }

    fn write_event(&mut self, name: &str, data: Option<&Value>, ts: Timestamp) {
        // {"timestamp": {...}, "event": ..., "data": ...}: QEMU's order.
        let mut head = String::new();
        let _ = core::fmt::Write::write_fmt(
            &mut head,
            format_args!(
                "{{\"timestamp\": {{\"seconds\": {}, \"microseconds\": {}}}, \"event\": ",
                ts.seconds, ts.microseconds
            ),
        );
        self.out.extend_from_slice(head.as_bytes());
        write_str(&mut self.out, name);
        if let Some(data) = data {
            self.out.extend_from_slice(b", \"data\": ");
            write_value(&mut self.out, data);
        }
        self.out.extend_from_slice(b"}\r\n");
    }
}
