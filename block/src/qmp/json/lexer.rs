//! The JSON lexer: QEMU's `qobject/json-lexer.c`, state for state.
//!
//! A byte-driven state machine that cuts the input into tokens. Like QEMU's
//! it accepts JSON (RFC 8259) plus single-quoted strings and `\'`; it
//! accepts any `[a-z]+` as a keyword and any byte `0x20..=0xFD` inside a
//! string, leaving it to the parser to reject unknown keywords, bad escapes
//! and invalid UTF-8. Its quirks are QEMU's: `0e1` is the integer `0`
//! followed by the keyword `e` and the integer `1`.
//!
//! On a byte no token can continue with, it emits an [`Kind::Error`] token
//! holding the text so far (QEMU's `JSON_ERROR`, reported as "stray") and
//! enters *recovery*: it skips bytes until a structural character
//! (`[]{}:,`), an ASCII control character other than `\t`, or the
//! impossible UTF-8 bytes `0xFE`/`0xFF`. Clients use that to force the
//! parser back into a known-good state (QMP spec, "Forcing the JSON parser
//! into known-good state").
//!
//! Where QEMU passes an over-long token on half-lexed (and then lexes the
//! rest of, say, a huge string as JSON), this lexer reports
//! [`Lexed::TooLong`] once and then swallows the rest of that token, so the
//! stream resynchronises at the token's real end.

use alloc::vec::Vec;

/// Token kinds (QEMU's `JSONTokenType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    String,
    /// A lexical error; the text is what was consumed, offending byte
    /// included.
    Error,
}

/// What the lexer hands to the streamer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lexed<'a> {
    Token(Kind, &'a [u8]),
    /// The token being lexed grew past the size limit; the rest of it is
    /// dropped.
    TooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    ExpDigits,
    ExpSign,
    ExpE,
    Mantissa,
    MantissaDigits,
    Digits,
    Sign,
    Keyword,
}

/// One transition of the state machine.
enum Step {
    /// Consume the byte, continue in this state.
    Next(State),
    /// Consume the byte, which completes a token.
    Emit(Kind),
    /// Do not consume: the token ended before this byte (QEMU's
    /// `TERMINAL()`/`LOOKAHEAD`); emit it and look at the byte again.
    Terminal(Kind),
    /// Consume and drop the byte (whitespace between tokens).
    Skip,
    /// Consume the byte, emit the text so far as an error, recover.
    Error,
    /// Recovery: drop the byte.
    Discard,
    /// Recovery ends before this byte; look at it again from `Start`.
    Resync,
}

fn step(state: State, b: u8) -> Step {
    use State::*;
    let in_string = (0x20..=0xFD).contains(&b);
    match state {
        Recovery => match b {
            b'\t' => Step::Discard,
            0..=0x1F | 0xFE | 0xFF | b'[' | b']' | b'{' | b'}' | b':' | b',' => Step::Resync,
            _ => Step::Discard,
        },
        DqEscape if in_string => Step::Next(DqString),
        SqEscape if in_string => Step::Next(SqString),
        DqString if in_string => match b {
            b'\\' => Step::Next(DqEscape),
            b'"' => Step::Emit(Kind::String),
            _ => Step::Next(DqString),
        },
        SqString if in_string => match b {
            b'\\' => Step::Next(SqEscape),
            b'\'' => Step::Emit(Kind::String),
            _ => Step::Next(SqString),
        },
        DqEscape | SqEscape | DqString | SqString => Step::Error,
        Zero => match b {
            b'0'..=b'9' => Step::Error,
            b'.' => Step::Next(Mantissa),
            _ => Step::Terminal(Kind::Integer),
        },
        ExpDigits => match b {
            b'0'..=b'9' => Step::Next(ExpDigits),
            _ => Step::Terminal(Kind::Float),
        },
        ExpSign => match b {
            b'0'..=b'9' => Step::Next(ExpDigits),
            _ => Step::Error,
        },
        ExpE => match b {
            b'-' | b'+' => Step::Next(ExpSign),
            b'0'..=b'9' => Step::Next(ExpDigits),
            _ => Step::Error,
        },
        MantissaDigits => match b {
            b'0'..=b'9' => Step::Next(MantissaDigits),
            b'e' | b'E' => Step::Next(ExpE),
            _ => Step::Terminal(Kind::Float),
        },
        Mantissa => match b {
            b'0'..=b'9' => Step::Next(MantissaDigits),
            _ => Step::Error,
        },
        Digits => match b {
            b'0'..=b'9' => Step::Next(Digits),
            b'e' | b'E' => Step::Next(ExpE),
            b'.' => Step::Next(Mantissa),
            _ => Step::Terminal(Kind::Integer),
        },
        Sign => match b {
            b'0' => Step::Next(Zero),
            b'1'..=b'9' => Step::Next(Digits),
            _ => Step::Error,
        },
        Keyword => match b {
            b'a'..=b'z' => Step::Next(Keyword),
            _ => Step::Terminal(Kind::Keyword),
        },
        Start => match b {
            b'"' => Step::Next(DqString),
            b'\'' => Step::Next(SqString),
            b'0' => Step::Next(Zero),
            b'1'..=b'9' => Step::Next(Digits),
            b'-' => Step::Next(Sign),
            b'{' => Step::Emit(Kind::LCurly),
            b'}' => Step::Emit(Kind::RCurly),
            b'[' => Step::Emit(Kind::LSquare),
            b']' => Step::Emit(Kind::RSquare),
            b',' => Step::Emit(Kind::Comma),
            b':' => Step::Emit(Kind::Colon),
            b'a'..=b'z' => Step::Next(Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => Step::Skip,
            _ => Step::Error,
        },
    }
}

/// The lexer (QEMU's `JSONLexer`).
#[derive(Debug)]
pub(crate) struct Lexer {
    state: State,
    token: Vec<u8>,
    max_token: usize,
    /// The current token outgrew `max_token` and is being swallowed.
    oversized: bool,
}

impl Lexer {
    pub(crate) fn new(max_token: usize) -> Self {
        Lexer {
            state: State::Start,
            token: Vec::new(),
            max_token,
            oversized: false,
        }
    }

    /// Forgets any partial token (QEMU: `json_lexer_destroy` + `_init`).
    pub(crate) fn reset(&mut self) {
        self.state = State::Start;
        self.token = Vec::new();
        self.oversized = false;
    }

    /// Feeds one byte; `emit` receives the tokens it completes, in order.
    pub(crate) fn feed_byte(&mut self, b: u8, emit: &mut impl FnMut(Lexed<'_>)) {
        loop {
            match step(self.state, b) {
                Step::Next(state) => {
                    self.push(b, emit);
                    self.state = state;
                    return;
                }
                Step::Emit(kind) => {
                    self.push(b, emit);
                    self.finish(kind, State::Start, emit);
                    return;
                }
                Step::Terminal(kind) => self.finish(kind, State::Start, emit),
                Step::Skip | Step::Discard => return,
                Step::Error => {
                    self.push(b, emit);
                    self.finish(Kind::Error, State::Recovery, emit);
                    return;
                }
                Step::Resync => self.state = State::Start,
            }
        }
    }

    /// Ends the input (QEMU's `json_lexer_flush`): a pending number or
    /// keyword is emitted, a pending string or sign is an error.
    pub(crate) fn flush(&mut self, emit: &mut impl FnMut(Lexed<'_>)) {
        while !matches!(self.state, State::Start | State::Recovery) {
            match step(self.state, 0) {
                Step::Terminal(kind) => self.finish(kind, State::Start, emit),
                _ => self.finish(Kind::Error, State::Start, emit),
            }
        }
        self.state = State::Start;
    }

    fn push(&mut self, b: u8, emit: &mut impl FnMut(Lexed<'_>)) {
        if self.oversized {
            return;
        }
        if self.token.len() >= self.max_token {
            self.oversized = true;
            self.token = Vec::new();
            emit(Lexed::TooLong);
            return;
        }
        self.token.push(b);
    }

    fn finish(&mut self, kind: Kind, next: State, emit: &mut impl FnMut(Lexed<'_>)) {
        if self.oversized {
            // The rest of a token already reported as too long: drop it,
            // unless it ended in a lexical error, which must still reset
            // the streamer.
            self.oversized = false;
            if kind == Kind::Error {
                emit(Lexed::Token(Kind::Error, &[]));
            }
        } else {
            emit(Lexed::Token(kind, &self.token));
        }
        self.token.clear();
        self.state = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;
    use alloc::vec;

    fn lex(input: &[u8]) -> Vec<(Kind, String)> {
        let mut lexer = Lexer::new(64);
        let mut out = Vec::new();
        let mut emit = |t: Lexed<'_>| match t {
            Lexed::Token(k, s) => out.push((k, String::from_utf8_lossy(s).into_owned())),
            Lexed::TooLong => out.push((Kind::Error, String::from("<too long>"))),
        };
        for &b in input {
            lexer.feed_byte(b, &mut emit);
        }
        lexer.flush(&mut emit);
        out
    }

    fn t(k: Kind, s: &str) -> (Kind, String) {
        (k, String::from(s))
    }

    #[test]
    fn tokens() {
        use Kind::*;
        assert_eq!(
            lex(br#"{"a": [1, -2.5e+3, 'x\'y', true]}"#),
            vec![
                t(LCurly, "{"),
                t(String, "\"a\""),
                t(Colon, ":"),
                t(LSquare, "["),
                t(Integer, "1"),
                t(Comma, ","),
                t(Float, "-2.5e+3"),
                t(Comma, ","),
                t(String, "'x\\'y'"),
                t(Comma, ","),
                t(Keyword, "true"),
                t(RSquare, "]"),
                t(RCurly, "}"),
            ]
        );
    }

    #[test]
    fn qemu_quirks() {
        use Kind::*;
        assert_eq!(
            lex(b"0e1"),
            vec![t(Integer, "0"), t(Keyword, "e"), t(Integer, "1")]
        );
        assert_eq!(lex(b"01"), vec![t(Error, "01")]);
        assert_eq!(lex(b"-x 1"), vec![t(Error, "-x")]);
        assert_eq!(
            lex(b"-x,1"),
            vec![t(Error, "-x"), t(Comma, ","), t(Integer, "1")]
        );
    }

    #[test]
    fn recovery_skips_to_structural_character() {
        use Kind::*;
        assert_eq!(
            lex(b"@garbage here{}"),
            vec![t(Error, "@"), t(LCurly, "{"), t(RCurly, "}")]
        );
        assert_eq!(
            lex(b"\"ab\ncd\",1"),
            vec![t(Error, "\"ab\n"), t(Comma, ","), t(Integer, "1")]
        );
    }

    #[test]
    fn flush_ends_pending_tokens() {
        use Kind::*;
        assert_eq!(lex(b"12"), vec![t(Integer, "12")]);
        assert_eq!(lex(b"\"ab"), vec![t(Error, "\"ab")]);
    }

    #[test]
    fn oversized_token_is_swallowed() {
        use Kind::*;
        let mut input = Vec::from(&b"\""[..]);
        input.extend(core::iter::repeat_n(b'x', 200));
        input.extend(b"\" 7");
        assert_eq!(lex(&input), vec![t(Error, "<too long>"), t(Integer, "7")]);
    }
}
