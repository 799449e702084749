//! QEMU's JSON dialect: lexer, streamer, parser and writer.
//!
//! | here | QEMU |
//! |---|---|
//! | `lexer` (private) | `qobject/json-lexer.c` |
//! | [`JsonStream`] | `qobject/json-streamer.c` (`JSONMessageParser`) |
//! | `parser` (private) | `qobject/json-parser.c` |
//! | [`to_string`], [`write_value`] | `qobject/json-writer.c` (`qobject_to_json`) |
//! | [`from_slice`] | `qobject/qjson.c` (`qobject_from_json`) |
//!
//! The dialect is JSON plus single-quoted strings and the `\'` escape, in
//! QEMU's modified UTF-8 (NUL as `C0 80`). Values are
//! [`serde_json::Value`]s; nothing here recurses per nesting level.

mod lexer;
pub(crate) mod parser;
mod stream;
mod utf8;
mod writer;

pub use stream::{Item, JsonStream, Limits};
pub use writer::{format_g17, qdict_cmp, qdict_order, to_string, write_str, write_value};

use alloc::string::String;
use serde_json::Value;

/// Parses exactly one JSON value (QEMU's `qobject_from_json`), e.g. a
/// `--blockdev '{...}'` option. Errors carry QEMU's texts. Where QEMU
/// returns neither value nor error for input without a value, this says
/// "Expecting a JSON value".
pub fn from_slice(input: &[u8]) -> Result<Value, String> {
    let mut stream = JsonStream::new();
    stream.feed(input);
    stream.finish();
    let mut result: Option<Result<Value, String>> = None;
    while let Some(item) = stream.pop() {
        match (&mut result, item) {
            (None, item) => result = Some(item),
            // Keep the first error.
            (Some(Err(_)), item) => {
                if let Ok(value) = item {
                    parser::drop_value(value);
                }
            }
            (Some(Ok(_)), item) => {
                if let Ok(value) = item {
                    parser::drop_value(value);
                }
                if let Some(Ok(value)) =
                    result.replace(Err(String::from("Expecting at most one JSON value")))
                {
                    parser::drop_value(value);
                }
            }
        }
    }
    result.unwrap_or_else(|| Err(String::from("Expecting a JSON value")))
}

/// Drops a value without recursing once per nesting level.
pub fn drop_value(value: Value) {
    parser::drop_value(value);
}
