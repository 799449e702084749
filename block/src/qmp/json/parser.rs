//! The JSON parser: QEMU's `qobject/json-parser.c`, made incremental.
//!
//! QEMU's 7.2 parser is recursive descent over the token list the streamer
//! collected for one top-level value. This one consumes tokens one at a
//! time and keeps its nesting on an explicit stack, so neither parsing nor
//! a deep value can exhaust a small kernel stack, and a syntax error is
//! noticed on the token that causes it. It reports the same first error
//! QEMU's parser reports, with the same words ("expecting value",
//! "missing : in object pair", "duplicate key", ...); the streamer prefixes
//! them with "JSON parse error, ".
//!
//! Values: strings are decoded from QEMU's modified UTF-8 (see
//! [`super::utf8`]); integers become `i64` if they fit, else `u64`, else
//! `f64` (QEMU's `QNum` rules); `f64` values too large to be finite, which
//! QEMU would keep as `inf`, become `null` (serde_json has no infinity).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use serde_json::{Map, Number, Value};

use super::lexer::Kind;
use super::utf8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArrayState {
    /// After `[`: a value or `]`.
    Open,
    /// After a value: `,` or `]`.
    Value,
    /// After `,`: a value.
    Comma,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjectState {
    /// After `{`: a key or `}`.
    Open,
    /// After a key: `:`.
    Key,
    /// After `:`: a value.
    Colon,
    /// After a value: `,` or `}`.
    Value,
    /// After `,`: a key.
    Comma,
}

#[derive(Debug)]
enum Frame {
    Array(Vec<Value>, ArrayState),
    Object(Map<String, Value>, String, ObjectState),
}

/// Parse error text without the "JSON parse error, " prefix.
pub(crate) type ParseError = String;

/// An incremental parser for one top-level value at a time.
#[derive(Debug, Default)]
pub(crate) struct Parser {
    stack: Vec<Frame>,
}

impl Drop for Parser {
    fn drop(&mut self) {
        self.reset();
    }
}

impl Parser {
    pub(crate) fn new() -> Self {
        Parser { stack: Vec::new() }
    }

    /// Whether a value is partially parsed.
    pub(crate) fn in_value(&self) -> bool {
        !self.stack.is_empty()
    }

    /// Drops any partial value.
    pub(crate) fn reset(&mut self) {
        while let Some(frame) = self.stack.pop() {
            match frame {
                Frame::Array(items, _) => items.into_iter().for_each(drop_value),
                Frame::Object(map, _, _) => map.into_iter().for_each(|(_, v)| drop_value(v)),
            }
        }
    }

    /// Consumes one token. Returns the value it completes, if any. After an
    /// error the caller must [`reset`](Self::reset) the parser.
    pub(crate) fn feed(&mut self, kind: Kind, text: &[u8]) -> Result<Option<Value>, ParseError> {
        let value = match self.stack.last_mut() {
            Some(Frame::Array(_, ArrayState::Value)) => {
                return match kind {
                    Kind::Comma => {
                        self.set_array_state(ArrayState::Comma);
                        Ok(None)
                    }
                    Kind::RSquare => self.close(),
                    _ => Err("expected separator in list".into()),
                };
            }
            Some(Frame::Object(_, _, ObjectState::Value)) => {
                return match kind {
                    Kind::Comma => {
                        self.set_object_state(ObjectState::Comma);
                        Ok(None)
                    }
                    Kind::RCurly => self.close(),
                    _ => Err("expected separator in dict".into()),
                };
            }
            Some(Frame::Object(_, _, ObjectState::Key)) => {
                return match kind {
                    Kind::Colon => {
                        self.set_object_state(ObjectState::Colon);
                        Ok(None)
                    }
                    _ => Err("missing : in object pair".into()),
                };
            }
            Some(Frame::Array(_, ArrayState::Open)) if kind == Kind::RSquare => {
                return self.close();
            }
            Some(Frame::Object(_, _, ObjectState::Open)) if kind == Kind::RCurly => {
                return self.close();
            }
            Some(Frame::Object(_, key, state @ (ObjectState::Open | ObjectState::Comma)))
                if kind == Kind::String =>
            {
                // QEMU parses the key as a value and then insists on a
                // string; a string token is the common case.
                *key = parse_string(text)?;
                *state = ObjectState::Key;
                return Ok(None);
            }
            // Everything else wants a value (a key position included: a
            // non-string key is parsed as a value, then rejected).
            _ => match kind {
                Kind::LCurly => {
                    self.stack
                        .push(Frame::Object(Map::new(), String::new(), ObjectState::Open));
                    return Ok(None);
                }
                Kind::LSquare => {
                    self.stack.push(Frame::Array(Vec::new(), ArrayState::Open));
                    return Ok(None);
                }
                Kind::String => Value::String(parse_string(text)?),
                Kind::Integer => parse_integer(text),
                Kind::Float => parse_float(text),
                Kind::Keyword => parse_keyword(text)?,
                Kind::RCurly | Kind::RSquare | Kind::Colon | Kind::Comma | Kind::Error => {
                    return Err("expecting value".into());
                }
            },
        };
        self.complete(value)
    }

    fn set_array_state(&mut self, new: ArrayState) {
        if let Some(Frame::Array(_, state)) = self.stack.last_mut() {
            *state = new;
        }
    }

    fn set_object_state(&mut self, new: ObjectState) {
        if let Some(Frame::Object(_, _, state)) = self.stack.last_mut() {
            *state = new;
        }
    }

    /// Closes the innermost container.
    fn close(&mut self) -> Result<Option<Value>, ParseError> {
        let value = match self.stack.pop() {
            Some(Frame::Array(items, _)) => Value::Array(items),
            Some(Frame::Object(map, _, _)) => Value::Object(map),
            None => return Err("expecting value".into()),
        };
        self.complete(value)
    }

    /// Hands a finished value to its container, or out if it is top-level.
    fn complete(&mut self, value: Value) -> Result<Option<Value>, ParseError> {
        match self.stack.last_mut() {
            None => Ok(Some(value)),
            Some(Frame::Array(items, state)) => {
                items.push(value);
                *state = ArrayState::Value;
                Ok(None)
            }
            Some(Frame::Object(map, key, state @ ObjectState::Colon)) => {
                if map.contains_key(key.as_str()) {
                    drop_value(value);
                    return Err("duplicate key".into());
                }
                map.insert(core::mem::take(key), value);
                *state = ObjectState::Value;
                Ok(None)
            }
            Some(Frame::Object(..)) => {
                drop_value(value);
                Err("key is not a string in object".into())
            }
        }
    }
}

/// Drops a value without recursion (serde_json's own `Drop` recurses once
/// per nesting level).
pub(crate) fn drop_value(value: Value) {
    let mut pending = Vec::new();
    pending.push(value);
    while let Some(value) = pending.pop() {
        match value {
            Value::Array(items) => pending.extend(items),
            Value::Object(map) => pending.extend(map.into_iter().map(|(_, v)| v)),
            _ => {}
        }
    }
}

fn parse_keyword(text: &[u8]) -> Result<Value, ParseError> {
    match text {
        b"true" => Ok(Value::Bool(true)),
        b"false" => Ok(Value::Bool(false)),
        b"null" => Ok(Value::Null),
        _ => Err(format!("invalid keyword '{}'", utf8::lossy(text))),
    }
}

fn parse_integer(text: &[u8]) -> Value {
    let s = core::str::from_utf8(text).unwrap_or("");
    if let Ok(i) = s.parse::<i64>() {
        return Value::Number(i.into());
    }
    if !s.starts_with('-')
        && let Ok(u) = s.parse::<u64>()
    {
        return Value::Number(u.into());
    }
    parse_float(text)
}

fn parse_float(text: &[u8]) -> Value {
    core::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .and_then(Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// The value of four hex digits at the start of `s` (QEMU's `cvt4hex`).
fn cvt4hex(s: &[u8]) -> Option<u32> {
    let digits = s.get(..4)?;
    digits.iter().try_fold(0u32, |cp, &d| {
        let v = char::from(d).to_digit(16)?;
        Some(cp << 4 | v)
    })
}

/// Decodes a string token, quotes included (QEMU's `parse_string`).
pub(crate) fn parse_string(token: &[u8]) -> Result<String, ParseError> {
    let Some((&quote, rest)) = token.split_first() else {
        return Err("expecting value".into());
    };
    // The lexer guarantees the token ends with its quote.
    let body = rest.strip_suffix(&[quote]).unwrap_or(rest);
    let mut out = String::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body[i] != b'\\' {
            match utf8::decode(&body[i..]) {
                (Some(c), used) => {
                    out.push(c);
                    i += used;
                }
                (None, _) => return Err("invalid UTF-8 sequence in string".into()),
            }
            continue;
        }
        let begin = i;
        let escaped = body.get(i + 1).copied().unwrap_or(0);
        i += 2;
        let c = match escaped {
            b'"' => '"',
            b'\'' => '\'',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let mut cp = cvt4hex(&body[i.min(body.len())..]);
                i += 4;
                if let Some(lead @ 0xD800..=0xDBFF) = cp
                    && body.get(i..i + 2) == Some(b"\\u")
                {
                    // a leading surrogate followed by \u: a pair, or invalid
                    cp = match cvt4hex(&body[i + 2..]) {
                        Some(trail @ 0xDC00..=0xDFFF) => {
                            i += 6;
                            Some(0x10000 + ((lead & 0x3FF) << 10) + (trail & 0x3FF))
                        }
                        _ => None,
                    };
                }
                match cp
                    .filter(|&cp| utf8::is_valid_codepoint(cp))
                    .and_then(char::from_u32)
                {
                    Some(c) => c,
                    None => {
                        // QEMU prints the escape as far as it read it; its
                        // token ends with the closing quote.
                        let shown = token
                            .get(1 + begin..(1 + i).min(token.len()))
                            .unwrap_or(&[]);
                        return Err(format!(
                            "{} is not a valid Unicode character",
                            utf8::lossy(shown)
                        ));
                    }
                }
            }
            _ => return Err("invalid escape sequence in string".into()),
        };
        out.push(c);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings() {
        assert_eq!(
            parse_string(br#""a\"b\'c\/\n""#).as_deref(),
            Ok("a\"b'c/\n")
        );
        assert_eq!(
            parse_string(br"'it\'s \u00e9 \ud83d\ude00'").as_deref(),
            Ok("it's é 😀")
        );
        assert_eq!(parse_string(b"\"\\u0000\xC0\x80\"").as_deref(), Ok("\0\0"));
        assert_eq!(
            parse_string(br#""\ud800x""#),
            Err("\\ud800 is not a valid Unicode character".into())
        );
        assert_eq!(
            parse_string(br#""\ud800\u0041""#),
            Err("\\ud800 is not a valid Unicode character".into())
        );
        assert_eq!(
            parse_string(br#""\uFFFE""#),
            Err("\\uFFFE is not a valid Unicode character".into())
        );
        assert_eq!(
            parse_string(br#""\u12""#),
            Err("\\u12\" is not a valid Unicode character".into())
        );
        assert_eq!(
            parse_string(br#""\x""#),
            Err("invalid escape sequence in string".into())
        );
        assert_eq!(
            parse_string(b"\"\xC3(\""),
            Err("invalid UTF-8 sequence in string".into())
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_integer(b"-0"), json!(0));
        assert_eq!(parse_integer(b"18446744073709551615"), json!(u64::MAX));
        assert_eq!(
            parse_integer(b"-9223372036854775809"),
            json!(-9223372036854775809.0)
        );
        assert_eq!(parse_float(b"1.5e3"), json!(1500.0));
        assert_eq!(parse_float(b"1e400"), Value::Null);
    }
}
