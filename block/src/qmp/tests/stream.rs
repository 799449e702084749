//! The byte stream: chunking, malformed JSON, limits, odd bytes.

use super::*;
use alloc::format;
use alloc::vec;

const REQUESTS: &str = concat!(
    r#"{"execute": "x-echo", "arguments": {"s": "a}b]c{d[e\"f'g\\h", "n": [1, -2.5e3, true, null]}, "id": "one"}"#,
    "\r\n",
    r#"{'execute':'x-nothing','id':2}"#,
    r#"  {"execute":"nope","id":{"k":[3]}}"#,
    "\n@\n",
    r#"{"execute": "x-echo", "arguments": {"u": "\u00e9\ud83d\ude00"}, "id": 4}"#,
);

fn expected_replies() -> Vec<String> {
    vec![
        String::from(
            r#"{"return": {"n": [1, -2500, true, null], "s": "a}b]c{d[e\"f'g\\h"}, "id": "one"}"#,
        ),
        String::from(r#"{"return": {}, "id": 2}"#),
        String::from(
            r#"{"id": {"k": [3]}, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
        ),
        generic("JSON parse error, stray '@'"),
        String::from(r#"{"return": {"u": "\u00E9\uD83D\uDE00"}, "id": 4}"#),
    ]
}

#[test]
fn several_requests_in_one_chunk() {
    let mut h = Harness::negotiated();
    assert_eq!(h.lines(REQUESTS), expected_replies());
}

#[test]
fn byte_by_byte() {
    let mut h = Harness::negotiated();
    let mut out = String::new();
    for b in REQUESTS.bytes() {
        out.push_str(&h.feed(&[b]).1);
    }
    assert_eq!(split_lines(&out), expected_replies());
}

#[test]
fn every_split_point() {
    let bytes = REQUESTS.as_bytes();
    for cut in 0..=bytes.len() {
        let mut h = Harness::negotiated();
        let mut out = h.feed(&bytes[..cut]).1;
        out.push_str(&h.feed(&bytes[cut..]).1);
        assert_eq!(split_lines(&out), expected_replies(), "split at {cut}");
    }
}

#[test]
fn replies_come_as_soon_as_a_request_is_complete() {
    let mut h = Harness::negotiated();
    assert_eq!(h.send(r#"{"execute": "x-nothing""#), "");
    assert_eq!(h.send("}"), "{\"return\": {}}\r\n");
    // A top-level number ends only at the next byte, as in QEMU.
    assert_eq!(h.send("12"), "");
    assert_eq!(
        h.lines("\n"),
        vec![generic("QMP input must be a JSON object")]
    );
}

/// Each malformed input gets exactly these errors, and a good request
/// right after it still works.
#[test]
fn malformed_json_then_a_good_request() {
    let cases: &[(&str, &[&str])] = &[
        ("}", &["JSON parse error, expecting value"]),
        ("]", &["JSON parse error, expecting value"]),
        (",", &["JSON parse error, expecting value"]),
        (":", &["JSON parse error, expecting value"]),
        (r#"{"execute": }"#, &["JSON parse error, expecting value"]),
        (
            r#"{"execute" "x"}"#,
            &["JSON parse error, missing : in object pair"],
        ),
        (
            r#"{"execute"}"#,
            &["JSON parse error, missing : in object pair"],
        ),
        (
            r#"{"a": 1 "b": 2}"#,
            &["JSON parse error, expected separator in dict"],
        ),
        (
            r#"{"a": [1 2]}"#,
            &["JSON parse error, expected separator in list"],
        ),
        (r#"{"a": [1,]}"#, &["JSON parse error, expecting value"]),
        (r#"{"a": 1,}"#, &["JSON parse error, expecting value"]),
        (r#"{"a": 1, "a": 2}"#, &["JSON parse error, duplicate key"]),
        (
            r#"{1: 2}"#,
            &["JSON parse error, key is not a string in object"],
        ),
        (
            r#"{[1]: 2}"#,
            &["JSON parse error, key is not a string in object"],
        ),
        (
            r#"{"a": {}: 2}"#,
            &["JSON parse error, expected separator in dict"],
        ),
        (
            r#"{"a": tru}"#,
            &["JSON parse error, invalid keyword 'tru'"],
        ),
        (
            r#"{"a": nul, "b": []}"#,
            &["JSON parse error, invalid keyword 'nul'"],
        ),
        (
            r#"{"a": 1]}"#,
            &["JSON parse error, expected separator in dict"],
        ),
        (r#"[}]"#, &["JSON parse error, expecting value"]),
        (
            r#"{"a": "\q"}"#,
            &["JSON parse error, invalid escape sequence in string"],
        ),
        (
            r#"{"a": "\uD800"}"#,
            &["JSON parse error, \\uD800 is not a valid Unicode character"],
        ),
        (
            r#"{"a": "\u00G0"}"#,
            &["JSON parse error, \\u00G0 is not a valid Unicode character"],
        ),
        (
            r#"{"a": @}"#,
            &[
                "JSON parse error, stray '@'",
                "JSON parse error, expecting value",
            ],
        ),
        ("@#$%", &["JSON parse error, stray '@'"]),
        ("True", &["JSON parse error, stray 'T'"]),
        ("-", &[]), // waits for a digit; the newline below is the error
        ("01", &["JSON parse error, stray '01'"]),
        ("\"abc\u{1}\"", &["JSON parse error, stray '\"abc\u{1}'"]),
        ("[1, 2", &[]), // unfinished: the good request below closes nothing
    ];
    for (input, errors) in cases {
        let mut h = Harness::negotiated();
        let mut want: Vec<String> = errors.iter().map(|e| generic(e)).collect();
        let out = h.lines(input);
        assert_eq!(out, want, "input {input:?}");
        if *input == "-" {
            assert_eq!(
                h.lines("\n"),
                vec![generic("JSON parse error, stray '-\n'")]
            );
        }
        if *input == "[1, 2" {
            // Completing the value gets it its own reply.
            assert_eq!(
                h.lines("]\n"),
                vec![generic("QMP input must be a JSON object")]
            );
        }
        want = vec![String::from(r#"{"return": {}, "id": "good"}"#)];
        assert_eq!(
            h.lines(r#"{"execute": "x-nothing", "id": "good"}"#),
            want,
            "after {input:?}"
        );
    }
}

#[test]
fn a_lexical_error_forces_a_reset() {
    let mut h = Harness::negotiated();
    // An unfinished request, abandoned...
    assert_eq!(h.send(r#"{"execute": "x-nothing", "arguments": {"#), "");
    // ... is discarded by a lexical error, the QMP spec's way to
    // resynchronise: an ASCII control character, or 0xFF (even in a string).
    assert_eq!(
        h.lines("\u{0}"),
        vec![generic("JSON parse error, stray ''")] // a C string stops at NUL
    );
    assert_eq!(
        h.lines(r#"{"execute": "x-nothing", "id": 1}"#),
        vec![r#"{"return": {}, "id": 1}"#]
    );
    assert_eq!(h.send(r#"{"execute": "x-nothing", "id": "in a string"#), "");
    let (_, out) = h.feed(b"\xFF");
    assert_eq!(
        split_lines(&out),
        vec![generic("JSON parse error, stray '\"in a string\u{FFFD}'")]
    );
    assert_eq!(
        h.lines(r#"{"execute": "x-nothing", "id": 2}"#),
        vec![r#"{"return": {}, "id": 2}"#]
    );
}

#[test]
fn invalid_utf8() {
    let mut h = Harness::negotiated();
    // In a string: the parser rejects it.
    let (_, out) = h.feed(b"{\"execute\": \"x-nothing\", \"id\": \"\xC3\x28\"}");
    assert_eq!(
        split_lines(&out),
        vec![generic(
            "JSON parse error, invalid UTF-8 sequence in string"
        )]
    );
    let (_, out) = h.feed(b"{\"execute\": \"x-nothing\", \"id\": \"\xED\xA0\x80\"}");
    assert_eq!(
        split_lines(&out),
        vec![generic(
            "JSON parse error, invalid UTF-8 sequence in string"
        )]
    );
    // QEMU's modified UTF-8 NUL and plain multi-byte characters are fine.
    let (_, out) = h.feed(b"{\"execute\": \"x-nothing\", \"id\": \"\xC0\x80\xE2\x82\xAC\"}");
    assert_eq!(
        split_lines(&out),
        vec![r#"{"return": {}, "id": "\u0000\u20AC"}"#]
    );
    // Outside strings: one stray error per run of garbage.
    let (_, out) = h.feed(b"\x80\x81\x82 {\"execute\": \"x-nothing\", \"id\": 3}");
    assert_eq!(
        split_lines(&out),
        vec![
            generic("JSON parse error, stray '\u{FFFD}'"),
            String::from(r#"{"return": {}, "id": 3}"#)
        ]
    );
    // Control characters resynchronise the lexer, so each is an error.
    let (_, out) = h.feed(b"\x01\x02{\"execute\": \"x-nothing\"}");
    assert_eq!(
        split_lines(&out),
        vec![
            generic("JSON parse error, stray '\u{1}'"),
            generic("JSON parse error, stray '\u{2}'"),
            String::from(r#"{"return": {}}"#)
        ]
    );
}

fn nested(depth: usize) -> String {
    format!(
        r#"{{"execute": "x-echo", "arguments": {{"deep": {}1{}}}, "id": {depth}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    )
}

#[test]
fn deep_nesting() {
    let mut h = Harness::negotiated();
    // Two braces plus 1022 brackets: exactly QEMU's limit of 1024.
    let out = h.lines(&nested(1022));
    assert_eq!(out.len(), 1);
    assert!(
        out[0].starts_with(r#"{"return": {"deep": [[[["#),
        "{}",
        &out[0][..40]
    );
    assert!(out[0].ends_with(r#"]]]]}, "id": 1022}"#));
    // One more is refused, once, and the stream recovers.
    assert_eq!(
        h.lines(&nested(1023)),
        vec![generic("JSON nesting depth limit exceeded")]
    );
    assert_eq!(
        h.lines(r#"{"execute": "x-nothing", "id": "ok"}"#),
        vec![r#"{"return": {}, "id": "ok"}"#]
    );
    // Far deeper than the limit, byte by byte, still one error.
    let mut out = String::new();
    for b in nested(100_000).bytes() {
        out.push_str(&h.feed(&[b]).1);
    }
    assert_eq!(
        split_lines(&out),
        vec![generic("JSON nesting depth limit exceeded")]
    );
    // A deep unfinished value dropped by a reset does not overflow the stack.
    assert_eq!(h.send(&"[".repeat(1000)), "");
    h.session.reset();
}

#[test]
fn deep_nesting_with_relaxed_limits() {
    let limits = Limits {
        max_nesting: 200_000,
        ..Limits::QEMU
    };
    let mut h = Harness::with(Session::new(VersionInfo::new(7, 2, 0)).with_limits(limits));
    assert_eq!(
        h.send(r#"{"execute": "qmp_capabilities"}"#),
        "{\"return\": {}}\r\n"
    );
    let deep = nested(100_000).replace("x-echo", "x-depth");
    assert_eq!(
        h.lines(&deep),
        vec![r#"{"return": {"depth": 100000}, "id": 100000}"#]
    );
}

#[test]
fn huge_input() {
    let limits = Limits {
        max_bytes: 4096,
        max_tokens: 100,
        ..Limits::QEMU
    };
    let mut h = Harness::with(Session::new(VersionInfo::new(7, 2, 0)).with_limits(limits));
    assert_eq!(
        h.send(r#"{"execute": "qmp_capabilities"}"#),
        "{\"return\": {}}\r\n"
    );

    // One huge string token: refused once, swallowed to its end.
    let huge = format!(
        r#"{{"execute": "x-echo", "arguments": {{"s": "{}"}}}}"#,
        "x".repeat(100_000)
    );
    assert_eq!(
        h.lines(&huge),
        vec![generic("JSON token size limit exceeded")]
    );
    assert_eq!(
        h.lines(r#"{"execute": "x-nothing", "id": 1}"#),
        vec![r#"{"return": {}, "id": 1}"#]
    );

    // Many small tokens adding up.
    let long = format!("\"{}\",", "s".repeat(1000));
    let many = format!(
        r#"{{"execute": "x-echo", "arguments": {{"a": [{}0]}}}}"#,
        long.repeat(10)
    );
    assert_eq!(
        h.lines(&many),
        vec![generic("JSON token size limit exceeded")]
    );

    // Too many tokens.
    let count = format!(
        r#"{{"execute": "x-echo", "arguments": {{"a": [{}0]}}}}"#,
        "1,".repeat(60)
    );
    assert_eq!(
        h.lines(&count),
        vec![generic("JSON token count limit exceeded")]
    );
    assert_eq!(
        h.lines(r#"{"execute": "x-nothing", "id": 2}"#),
        vec![r#"{"return": {}, "id": 2}"#]
    );

    // Within limits is fine.
    let ok = format!(
        r#"{{"execute": "x-echo", "arguments": {{"s": "{}"}}}}"#,
        "y".repeat(3000)
    );
    assert_eq!(h.lines(&ok).len(), 1);

    // With QEMU's limits a megabyte is an ordinary request.
    let mut h = Harness::negotiated();
    let big = format!(
        r#"{{"execute": "x-echo", "arguments": {{"s": "{}"}}}}"#,
        "z".repeat(1 << 20)
    );
    let out = h.lines(&big);
    assert_eq!(out[0].len(), (1 << 20) + r#"{"return": {"s": ""}}"#.len());
}

#[test]
fn json_from_slice() {
    assert_eq!(
        json::from_slice(br#" {"a": [1, 'b']} "#),
        Ok(json!({"a": [1, "b"]}))
    );
    assert_eq!(json::from_slice(b"42"), Ok(json!(42)));
    assert_eq!(
        json::from_slice(b"1 2"),
        Err(String::from("Expecting at most one JSON value"))
    );
    assert_eq!(
        json::from_slice(br#"{"a": 1"#),
        Err(String::from("JSON parse error, premature EOI"))
    );
    assert_eq!(
        json::from_slice(br#""abc"#),
        Err(String::from("JSON parse error, stray '\"abc'"))
    );
    assert_eq!(
        json::from_slice(b"[1,]"),
        Err(String::from("JSON parse error, expecting value"))
    );
    assert_eq!(
        json::from_slice(b"  "),
        Err(String::from("Expecting a JSON value"))
    );
}

#[test]
fn stream_api() {
    let mut s = json::JsonStream::with_limits(Limits {
        max_nesting: 2,
        ..Limits::QEMU
    });
    s.feed(b"[[1]] [[[1]]] {");
    assert!(s.has_ready());
    assert_eq!(s.pop(), Some(Ok(json!([[1]]))));
    assert_eq!(
        s.pop(),
        Some(Err(String::from("JSON nesting depth limit exceeded")))
    );
    assert_eq!(s.pop(), None);
    s.reset();
    s.feed(b"}");
    assert_eq!(
        s.pop(),
        Some(Err(String::from("JSON parse error, expecting value")))
    );
    assert_eq!(s.limits().max_nesting, 2);
    // Once a message is known bad, nothing more is reported for it.
    let mut s = json::JsonStream::with_limits(Limits {
        max_bytes: 8,
        ..Limits::QEMU
    });
    s.feed(br#"[1 2, "a very long string", @] "also much too long" 3 "#);
    assert_eq!(
        s.pop(),
        Some(Err(String::from(
            "JSON parse error, expected separator in list"
        )))
    );
    assert_eq!(
        s.pop(),
        Some(Err(String::from("JSON parse error, stray '@'")))
    );
    assert_eq!(
        s.pop(),
        Some(Err(String::from("JSON parse error, expecting value")))
    );
    assert_eq!(
        s.pop(),
        Some(Err(String::from("JSON token size limit exceeded")))
    );
    assert_eq!(s.pop(), Some(Ok(json!(3))));
    assert_eq!(s.pop(), None);
}
