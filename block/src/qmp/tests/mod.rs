//! Host tests of the QMP engine, through the public API.

mod args;
mod fuzz;
pub(crate) mod schema;
mod session;
mod stream;

use super::*;
use alloc::string::String;
use alloc::vec::Vec;
use serde_json::{Value, json};

/// A context that records what handlers did.
#[derive(Default)]
pub(super) struct Ctx {
    pub events: Vec<Event>,
    pub calls: usize,
}

impl QmpContext for Ctx {
    fn drain_events(&mut self, out: &mut Vec<Event>) {
        out.append(&mut self.events);
    }
}

fn echo(ctx: &mut Ctx, args: &Args<'_>) -> QmpResult {
    ctx.calls += 1;
    Ok(Value::Object(args.map().clone()))
}

fn nothing(ctx: &mut Ctx, args: &Args<'_>) -> QmpResult {
    ctx.calls += 1;
    args.check_known(&[])?;
    Ok(Value::Null)
}

fn fail(_: &mut Ctx, args: &Args<'_>) -> QmpResult {
    let device = args.str("device")?;
    args.check_known(&["device"])?;
    Err(QmpError::device_not_found(alloc::format!(
        "Device '{device}' not found"
    )))
}

fn raise(ctx: &mut Ctx, args: &Args<'_>) -> QmpResult {
    args.check_known(&[])?;
    let ts = Timestamp {
        seconds: 10,
        microseconds: 20,
    };
    ctx.events.push(Event::new(
        "JOB_STATUS_CHANGE",
        Some(json!({"id": "j0", "status": "running"})),
        ts,
    ));
    ctx.events.push(Event::new("STOP", None, ts));
    Ok(json!({}))
}

/// Nesting depth of `deep`, without recursion.
fn depth(_: &mut Ctx, args: &Args<'_>) -> QmpResult {
    let mut value = args.value("deep")?;
    let mut depth = 0u64;
    while let Some(inner) = value.as_array().and_then(|a| a.first()) {
        depth += 1;
        value = inner;
    }
    Ok(json!({"depth": depth}))
}

/// A table with a few test commands.
pub(super) fn commands() -> Dispatcher<Ctx> {
    let mut d = Dispatcher::new();
    d.register("x-echo", Signature::new("..", "any"), echo);
    d.register("x-nothing", Signature::NONE, nothing);
    d.register("x-fail", Signature::new("device:str", "{}"), fail);
    d.register("x-raise", Signature::NONE, raise);
    d.register("x-depth", Signature::new("deep:any", "{depth:int}"), depth);
    d
}

/// A session, its commands and context.
pub(super) struct Harness {
    pub session: Session,
    pub commands: Dispatcher<Ctx>,
    pub ctx: Ctx,
}

impl Harness {
    pub fn new() -> Self {
        Self::with(Session::new(VersionInfo::new(7, 2, 0)))
    }

    pub fn with(session: Session) -> Self {
        Harness {
            session,
            commands: commands(),
            ctx: Ctx::default(),
        }
    }

    /// A harness past `qmp_capabilities`.
    pub fn negotiated() -> Self {
        let mut h = Self::new();
        assert_eq!(
            h.send(r#"{"execute": "qmp_capabilities"}"#),
            "{\"return\": {}}\r\n"
        );
        h
    }

    /// Feeds bytes, returns the output.
    pub fn feed(&mut self, input: &[u8]) -> (Action, String) {
        let action = self.session.feed(input, &self.commands, &mut self.ctx);
        let out = self.session.take_output();
        (action, String::from_utf8(out).expect("QMP output is ASCII"))
    }

    /// Feeds a string, returns the output.
    pub fn send(&mut self, input: &str) -> String {
        self.feed(input.as_bytes()).1
    }

    /// Feeds a string, returns the output lines (without `\r\n`).
    pub fn lines(&mut self, input: &str) -> Vec<String> {
        split_lines(&self.send(input))
    }
}

/// Splits output into messages, checking each ends in `\r\n` and is JSON.
pub(super) fn split_lines(out: &str) -> Vec<String> {
    assert!(
        out.is_empty() || out.ends_with("\r\n"),
        "unterminated output {out:?}"
    );
    out.split_terminator("\r\n")
        .map(|line| {
            // (serde_json's own parser stops at depth 128; ours does not)
            assert!(
                json::from_slice(line.as_bytes()).is_ok(),
                "not JSON: {line:?}"
            );
            String::from(line)
        })
        .collect()
}

/// `{"error": {"class": "GenericError", "desc": DESC}}`.
pub(super) fn generic(desc: &str) -> String {
    let mut out = String::from(r#"{"error": {"class": "GenericError", "desc": "#);
    out.push_str(&json::to_string(&Value::from(desc)));
    out.push_str("}}");
    out
}
