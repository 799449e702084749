//! QMP, the QEMU Machine Protocol: blockhaus's control plane.
//!
//! Platform-free and sans I/O: bytes in, bytes out. The layers, bottom up,
//! with the QEMU code each one follows:
//!
//! 1. [`json`] — QEMU's JSON dialect. A lexer (`json-lexer.c`) and a
//!    streamer (`json-streamer.c`) cut an arbitrarily chunked byte stream
//!    into top-level values, counting braces and brackets, enforcing QEMU's
//!    size/token/nesting limits and resynchronising after garbage; an
//!    incremental parser (`json-parser.c`) builds [`serde_json::Value`]s
//!    and reports QEMU's "JSON parse error, ..." texts; a writer
//!    (`json-writer.c`) prints replies byte-for-byte as QEMU does,
//!    members in QEMU's `QDict` order. No byte sequence makes any of it
//!    panic.
//! 2. [`QmpError`]/[`ErrorClass`] (`qapi/error.h`, `qerror.h`) and
//!    [`Args`], the typed view of a command's arguments with the QAPI input
//!    visitor's error texts (`qobject-input-visitor.c`).
//! 3. [`Dispatcher`] (`qmp-registry.c`): the command table, generic over
//!    the context `C` the kernel runs commands against, with
//!    [`Handler`]`<C>` functions.
//! 4. [`Session`] (`monitor/qmp.c`, `qapi/qmp-dispatch.c`): one connection
//!    — greeting, capabilities negotiation, request checking, dispatch,
//!    `id` echo, events, and the [built-in commands](builtins)
//!    (`qmp_capabilities`, `query-version`, `query-commands`,
//!    `query-status`, `quit`, `query-qmp-schema`).
//! 5. [`schema`]: each command's [`Signature`], checked by the session
//!    before the handler runs and reported by `query-qmp-schema`.
//!
//! ```
//! use block::qmp::{Action, Args, Dispatcher, QmpContext, QmpError, Session, Signature, VersionInfo};
//! use serde_json::{Value, json};
//!
//! struct Ctx;
//! impl QmpContext for Ctx {}
//!
//! fn hello(_: &mut Ctx, args: &Args<'_>) -> Result<Value, QmpError> {
//!     let name = args.str("name")?;
//!     args.check_known(&["name"])?;
//!     Ok(json!({"greeting": name}))
//! }
//!
//! let mut commands = Dispatcher::new();
//! commands.register("x-hello", Signature::new("name:str", "{greeting:str}"), hello);
//! let mut session = Session::new(VersionInfo::new(7, 2, 0));
//! let mut out = session.greeting();
//! let input = br#"{"execute": "qmp_capabilities"}
//!     {"execute": "x-hello", "arguments": {"name": "qemu"}, "id": 1}"#;
//! assert_eq!(session.feed(input, &commands, &mut Ctx), Action::Continue);
//! out.extend(session.take_output());
//! assert!(out.ends_with(b"{\"return\": {}}\r\n{\"return\": {\"greeting\": \"qemu\"}, \"id\": 1}\r\n"));
//! ```

mod args;
pub mod builtins;
mod dispatch;
mod error;
mod event;
pub mod json;
pub mod schema;
mod session;

#[cfg(test)]
pub(crate) mod tests;

pub use args::Args;
pub use builtins::{BUILTINS, PACKAGE, VersionInfo};
pub use dispatch::{Dispatcher, Handler, QmpContext};
pub use error::{ErrorClass, QmpError, QmpResult};
pub use event::{Event, Timestamp};
pub use json::Limits;
pub use schema::Signature;
pub use session::{Action, Session};
