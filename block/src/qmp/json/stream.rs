//! The JSON streamer: QEMU's `qobject/json-streamer.c`.
//!
//! It turns a byte stream, chunked any way at all, into a sequence of
//! top-level JSON values and errors. Bytes go through the [`Lexer`]; tokens
//! go to the incremental [`Parser`]; the streamer counts braces and brackets
//! to know where a message ends, enforces QEMU's limits and resynchronises
//! after errors:
//!
//! * a lexical error ("JSON parse error, stray '...'") resets everything, as
//!   in QEMU: it is the documented way for a client to force the parser back
//!   into a known-good state (send `0xFF`, or a control character);
//! * a syntax error ("JSON parse error, expecting value", ...) or a limit
//!   error ("JSON nesting depth limit exceeded", "JSON token size limit
//!   exceeded", "JSON token count limit exceeded") is reported once, then
//!   the rest of that message is swallowed until its braces and brackets
//!   balance. QEMU 7.2 instead restarts right after the bad token and so
//!   answers the tail of a broken message with more errors; recent QEMU
//!   recovers like this. Counts never go negative, so a stray `}` or `]`
//!   is one error.
//!
//! Error replies carry no `id`: there is no request to take it from.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use serde_json::Value;

use super::lexer::{Kind, Lexed, Lexer};
use super::parser::Parser;
use super::utf8;

/// Resource limits on one top-level value. The defaults are QEMU's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes of the tokens of one value, and of any single token
    /// (QEMU's `MAX_TOKEN_SIZE`, 64 MiB).
    pub max_bytes: usize,
    /// Tokens in one value (QEMU's `MAX_TOKEN_COUNT`, 2 Mi).
    pub max_tokens: usize,
    /// Open braces plus brackets (QEMU's `MAX_NESTING`, 1024).
    pub max_nesting: usize,
}

impl Limits {
    /// QEMU's limits.
    pub const QEMU: Limits = Limits {
        max_bytes: 64 << 20,
        max_tokens: 2 << 20,
        max_nesting: 1 << 10,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::QEMU
    }
}

/// One item out of the stream: a value, or the text of a parse error
/// (reported to QMP clients as a `GenericError`).
pub type Item = Result<Value, String>;

/// Splits a byte stream into JSON values (QEMU's `JSONMessageParser`).
#[derive(Debug)]
pub struct JsonStream {
    lexer: Lexer,
    split: Splitter,
}

/// Everything but the lexer, so that the lexer's callback can borrow it.
#[derive(Debug)]
struct Splitter {
    parser: Parser,
    limits: Limits,
    brace_count: usize,
    bracket_count: usize,
    token_size: usize,
    token_count: usize,
    /// After an error, swallow tokens until the counts balance.
    recovering: bool,
    ready: VecDeque<Item>,
}

impl JsonStream {
    /// A stream with QEMU's limits.
    pub fn new() -> Self {
        Self::with_limits(Limits::QEMU)
    }

    /// A stream with the given limits.
    pub fn with_limits(limits: Limits) -> Self {
        JsonStream {
            lexer: Lexer::new(limits.max_bytes),
            split: Splitter {
                parser: Parser::new(),
                limits,
                brace_count: 0,
                bracket_count: 0,
                token_size: 0,
                token_count: 0,
                recovering: false,
                ready: VecDeque::new(),
            },
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.split.limits
    }

    /// Feeds bytes; complete values and errors queue up for [`pop`](Self::pop).
    pub fn feed(&mut self, bytes: &[u8]) {
        let split = &mut self.split;
        let mut emit = |lexed: Lexed<'_>| split.on_lexed(lexed);
        for &b in bytes {
            self.lexer.feed_byte(b, &mut emit);
        }
    }

    /// Ends the input: flushes a pending token and reports an unfinished
    /// value ("JSON parse error, premature EOI"). The stream is reset.
    pub fn finish(&mut self) {
        let split = &mut self.split;
        self.lexer
            .flush(&mut |lexed: Lexed<'_>| split.on_lexed(lexed));
        if split.parser.in_value() && !split.recovering {
            split
                .ready
                .push_back(Err(String::from("JSON parse error, premature EOI")));
        }
        split.reset_message();
    }

    /// The next value or error, in input order.
    pub fn pop(&mut self) -> Option<Item> {
        self.split.ready.pop_front()
    }

    /// Whether a value or error is waiting.
    pub fn has_ready(&self) -> bool {
        !self.split.ready.is_empty()
    }

    /// Forgets everything: partial input and queued items.
    pub fn reset(&mut self) {
        self.lexer.reset();
        self.split.reset_message();
        self.discard_ready();
    }

    /// Drops the queued items, keeping partial input.
    pub fn discard_ready(&mut self) {
        while let Some(item) = self.split.ready.pop_front() {
            if let Ok(value) = item {
                super::parser::drop_value(value);
            }
        }
    }
}

impl Default for JsonStream {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for JsonStream {
    fn drop(&mut self) {
        self.discard_ready();
    }
}

impl Splitter {
    fn on_lexed(&mut self, lexed: Lexed<'_>) {
        match lexed {
            Lexed::TooLong => {
                if !self.recovering {
                    self.fail(String::from("JSON token size limit exceeded"));
                    self.end_if_balanced();
                }
            }
            Lexed::Token(Kind::Error, text) => {
                self.ready.push_back(Err(format!(
                    "JSON parse error, stray '{}'",
                    utf8::lossy(text)
                )));
                self.reset_message();
            }
            Lexed::Token(kind, text) => self.on_token(kind, text),
        }
    }

    fn on_token(&mut self, kind: Kind, text: &[u8]) {
        match kind {
            Kind::LCurly => self.brace_count += 1,
            Kind::RCurly => self.brace_count = self.brace_count.saturating_sub(1),
            Kind::LSquare => self.bracket_count += 1,
            Kind::RSquare => self.bracket_count = self.bracket_count.saturating_sub(1),
            _ => {}
        }
        if !self.recovering {
            let limits = self.limits;
            if self.token_size.saturating_add(text.len()) >= limits.max_bytes {
                self.fail(String::from("JSON token size limit exceeded"));
            } else if self.token_count >= limits.max_tokens {
                self.fail(String::from("JSON token count limit exceeded"));
            } else if self.brace_count + self.bracket_count > limits.max_nesting {
                self.fail(String::from("JSON nesting depth limit exceeded"));
            } else {
                self.token_size += text.len();
                self.token_count += 1;
                match self.parser.feed(kind, text) {
                    Ok(Some(value)) => self.ready.push_back(Ok(value)),
                    Ok(None) => {}
                    Err(msg) => self.fail(format!("JSON parse error, {msg}")),
                }
            }
        }
        self.end_if_balanced();
    }

    /// At a message boundary, starts afresh (and ends any recovery).
    fn end_if_balanced(&mut self) {
        if self.brace_count == 0 && self.bracket_count == 0 && !self.parser.in_value() {
            self.reset_message();
        }
    }

    /// Reports an error and swallows the rest of the message.
    fn fail(&mut self, desc: String) {
        self.ready.push_back(Err(desc));
        self.parser.reset();
        self.recovering = true;
    }

    fn reset_message(&mut self) {
        self.parser.reset();
        self.brace_count = 0;
        self.bracket_count = 0;
        self.token_size = 0;
        self.token_count = 0;
        self.recovering = false;
    }
}
