//! Negotiation, request checking, dispatch, `id` echo, built-ins, events.

use super::*;
use alloc::format;
use alloc::vec;

const NEGOTIATE: &str = r#"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#;

#[test]
fn greeting_is_qemus() {
    let session = Session::new(VersionInfo::new(7, 2, 0));
    let expected = format!(
        "{{\"QMP\": {{\"version\": {{\"qemu\": {{\"micro\": 0, \"minor\": 2, \"major\": 7}}, \
         \"package\": \"blockhaus {}\"}}, \"capabilities\": [\"oob\"]}}}}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(String::from_utf8(session.greeting()).unwrap(), expected);
    let session = Session::new(VersionInfo::new(7, 2, 0)).with_oob_offered(false);
    assert!(session.greeting().ends_with(b"\"capabilities\": []}}\r\n"));
}

#[test]
fn commands_before_negotiation_are_refused() {
    let mut h = Harness::new();
    assert_eq!(h.lines(r#"{"execute": "query-version"}"#), vec![NEGOTIATE]);
    assert_eq!(
        h.lines(r#"{"execute": "x-echo", "id": 3}"#),
        vec![
            r#"{"id": 3, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#
        ]
    );
    assert_eq!(
        h.lines(r#"{"execute": "no-such-command"}"#),
        vec![NEGOTIATE]
    );
    assert_eq!(h.ctx.calls, 0);
    // Malformed requests are not rewritten: only CommandNotFound is.
    assert_eq!(
        h.lines(r#"{"foo": 1}"#),
        vec![generic("QMP input member 'foo' is unexpected")]
    );
    assert_eq!(
        h.lines(r#"{"exec-oob": "qmp_capabilities"}"#),
        vec![generic("QMP input member 'exec-oob' is unexpected")]
    );
    assert!(!h.session.is_negotiated());
}

#[test]
fn negotiation() {
    let mut h = Harness::new();
    assert_eq!(
        h.send(r#"{"execute": "qmp_capabilities", "id": "c"}"#),
        "{\"return\": {}, \"id\": \"c\"}\r\n"
    );
    assert!(h.session.is_negotiated());
    assert!(!h.session.oob_enabled());
    assert_eq!(
        h.lines(r#"{"execute": "qmp_capabilities"}"#),
        vec![
            r#"{"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#
        ]
    );
    assert_eq!(
        h.lines(r#"{"execute": "x-nothing"}"#),
        vec![r#"{"return": {}}"#]
    );
    // A new client starts over.
    h.session.reset();
    assert!(!h.session.is_negotiated());
    assert_eq!(h.lines(r#"{"execute": "x-nothing"}"#), vec![NEGOTIATE]);
}

#[test]
fn negotiation_arguments() {
    let mut h = Harness::new();
    assert_eq!(
        h.lines(r#"{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}"#),
        vec![generic(
            "Invalid parameter type for 'enable', expected: array"
        )]
    );
    assert_eq!(
        h.lines(r#"{"execute": "qmp_capabilities", "arguments": {"enable": [1]}}"#),
        vec![generic(
            "Invalid parameter type for 'enable[0]', expected: string"
        )]
    );
    assert_eq!(
        h.lines(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}}"#),
        vec![generic("Parameter 'null' does not accept value 'foo'")]
    );
    assert_eq!(
        h.lines(r#"{"execute": "qmp_capabilities", "arguments": {"bogus": 1}}"#),
        vec![generic("Parameter 'bogus' is unexpected")]
    );
    assert!(!h.session.is_negotiated());
    assert_eq!(
        h.lines(r#"{"execute": "qmp_capabilities", "arguments": {"enable": []}}"#),
        vec![r#"{"return": {}}"#]
    );
    assert!(!h.session.oob_enabled());
}

#[test]
fn oob() {
    let mut h = Harness::new();
    assert_eq!(
        h.lines(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#),
        vec![r#"{"return": {}}"#]
    );
    assert!(h.session.oob_enabled());
    assert_eq!(
        h.lines(r#"{"exec-oob": "query-status", "id": 1}"#),
        vec![format!(
            "{{\"id\": 1, {}",
            &generic("The command query-status does not support OOB")[1..]
        )]
    );
    assert_eq!(
        h.lines(r#"{"exec-oob": "x-nothing", "execute": "x-nothing"}"#),
        vec![generic(
            "QMP input member 'execute' clashes with 'exec-oob'"
        )]
    );
    assert_eq!(
        h.lines(r#"{"exec-oob": 1}"#),
        vec![generic("QMP input member 'exec-oob' must be a string")]
    );
    assert_eq!(
        h.lines(r#"{"exec-oob": "nope"}"#),
        vec![
            r#"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#
        ]
    );

    // A monitor that does not offer OOB refuses it.
    let mut h = Harness::with(Session::new(VersionInfo::new(7, 2, 0)).with_oob_offered(false));
    assert_eq!(
        h.lines(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob", "oob"]}}"#),
        vec![generic("Capability oob, oob not available")]
    );
    assert!(!h.session.is_negotiated());
}

#[test]
fn request_errors() {
    let mut h = Harness::negotiated();
    // (a top-level number or keyword ends at the byte after it)
    for input in ["[]", "[1, 2]", "1 ", "\"execute\"", "null\n", "true\t"] {
        assert_eq!(
            h.lines(input),
            vec![generic("QMP input must be a JSON object")],
            "{input}"
        );
    }
    assert_eq!(
        h.lines(r#"{"id": 5}"#),
        vec![
            r#"{"id": 5, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#
        ]
    );
    assert_eq!(
        h.lines("{}"),
        vec![generic("QMP input lacks member 'execute'")]
    );
    assert_eq!(
        h.lines(r#"{"execute": 1}"#),
        vec![generic("QMP input member 'execute' must be a string")]
    );
    assert_eq!(
        h.lines(r#"{"execute": ["x-nothing"], "id": "s"}"#),
        vec![
            r#"{"id": "s", "error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}"#
        ]
    );
    assert_eq!(
        h.lines(r#"{"execute": "x-nothing", "arguments": []}"#),
        vec![generic("QMP input member 'arguments' must be an object")]
    );
    assert_eq!(
        h.lines(r#"{"execute": "x-nothing", "arguments": null}"#),
        vec![generic("QMP input member 'arguments' must be an object")]
    );
    assert_eq!(
        h.lines(r#"{"execute": "x-nothing", "foo": 1}"#),
        vec![generic("QMP input member 'foo' is unexpected")]
    );
    // without OOB, exec-oob is just another member
    assert_eq!(
        h.lines(r#"{"exec-oob": "x-nothing"}"#),
        vec![generic("QMP input member 'exec-oob' is unexpected")]
    );
    assert_eq!(
        h.lines(r#"{"execute": "blockdev-frobnicate", "id": 7}"#),
        vec![
            r#"{"id": 7, "error": {"class": "CommandNotFound", "desc": "The command blockdev-frobnicate has not been found"}}"#
        ]
    );
    assert_eq!(h.ctx.calls, 0);
}

#[test]
fn handler_results_and_errors() {
    let mut h = Harness::negotiated();
    assert_eq!(
        h.lines(r#"{"execute": "x-echo", "arguments": {"b": [1, {"c": null}], "a": "s"}}"#),
        vec![r#"{"return": {"a": "s", "b": [1, {"c": null}]}}"#]
    );
    assert_eq!(
        h.lines(r#"{"execute": "x-fail", "arguments": {"device": "ide0"}, "id": 2}"#),
        vec![
            r#"{"id": 2, "error": {"class": "DeviceNotFound", "desc": "Device 'ide0' not found"}}"#
        ]
    );
    assert_eq!(
        h.lines(r#"{"execute": "x-fail"}"#),
        vec![generic("Parameter 'device' is missing")]
    );
    assert_eq!(
        h.lines(r#"{"execute": "x-fail", "arguments": {"device": "d", "extra": 1}}"#),
        vec![generic("Parameter 'extra' is unexpected")]
    );
    assert_eq!(
        h.lines(r#"{"execute": "x-nothing", "arguments": {}}"#),
        vec![r#"{"return": {}}"#]
    );
}

#[test]
fn id_is_echoed_verbatim() {
    let mut h = Harness::negotiated();
    for id in [
        "0",
        "-1",
        "18446744073709551615",
        "-9223372036854775808",
        "1.5",
        "\"libvirt-12\"",
        "\"\\u00e9\\n\"",
        "null",
        "false",
        "[]",
        "[1, \"two\", {\"three\": [3]}]",
        "{\"a\": {\"b\": {}}, \"n\": -2}",
    ] {
        let want_id = json::to_string(&serde_json::from_str::<Value>(id).unwrap());
        assert_eq!(
            h.lines(&format!(r#"{{"execute": "x-nothing", "id": {id}}}"#)),
            vec![format!("{{\"return\": {{}}, \"id\": {want_id}}}")],
        );
        assert_eq!(
            h.lines(&format!(r#"{{"execute": "nope", "id": {id}}}"#)),
            vec![format!(
                "{{\"id\": {want_id}, \"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}}}"
            )],
        );
    }
    // QEMU prints non-ASCII as \u escapes and floats with %.17g.
    assert_eq!(
        h.lines(r#"{"execute": "x-nothing", "id": ["é", 0.1]}"#),
        vec![r#"{"return": {}, "id": ["\u00E9", 0.10000000000000001]}"#]
    );
    // Single-quoted strings are QEMU JSON too.
    assert_eq!(
        h.lines("{'execute': 'x-nothing', 'id': 'it\\'s'}"),
        vec![r#"{"return": {}, "id": "it's"}"#]
    );
}

#[test]
fn query_version() {
    let mut h = Harness::negotiated();
    assert_eq!(
        h.lines(r#"{"execute": "query-version"}"#),
        vec![format!(
            "{{\"return\": {{\"qemu\": {{\"micro\": 0, \"minor\": 2, \"major\": 7}}, \"package\": \"{PACKAGE}\"}}}}"
        )]
    );
    assert_eq!(
        h.lines(r#"{"execute": "query-version", "arguments": {"x": 1}}"#),
        vec![generic("Parameter 'x' is unexpected")]
    );
}

#[test]
fn query_status() {
    let mut h = Harness::negotiated();
    assert_eq!(
        h.lines(r#"{"execute": "query-status", "id": 1}"#),
        vec![r#"{"return": {"status": "running", "singlestep": false, "running": true}, "id": 1}"#]
    );
}

#[test]
fn query_commands_lists_everything() {
    let mut h = Harness::negotiated();
    let out = h.lines(r#"{"execute": "query-commands"}"#);
    let reply: Value = serde_json::from_str(&out[0]).unwrap();
    let names: Vec<&str> = reply["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "x-depth",
            "x-raise",
            "x-fail",
            "x-nothing",
            "x-echo",
            "query-qmp-schema",
            "quit",
            "query-status",
            "query-commands",
            "query-version",
            "qmp_capabilities"
        ]
    );
    assert_eq!(
        h.commands.names().collect::<Vec<_>>(),
        ["x-echo", "x-nothing", "x-fail", "x-raise", "x-depth"]
    );
    // The exact shape, on a smaller table.
    let mut h = Harness::negotiated();
    h.commands = Dispatcher::new();
    assert_eq!(
        h.lines(r#"{"execute": "query-commands"}"#),
        vec![
            r#"{"return": [{"name": "query-qmp-schema"}, {"name": "quit"}, {"name": "query-status"}, {"name": "query-commands"}, {"name": "query-version"}, {"name": "qmp_capabilities"}]}"#
        ]
    );
}

#[test]
fn registered_commands_override_builtins() {
    fn paused(_: &mut Ctx, _: &Args<'_>) -> QmpResult {
        Ok(json!({"status": "paused", "singlestep": false, "running": false}))
    }
    fn capabilities(_: &mut Ctx, _: &Args<'_>) -> QmpResult {
        Err(QmpError::generic("must not run"))
    }
    let mut h = Harness::negotiated();
    h.commands
        .register("query-status", crate::qmp::Signature::NONE, paused);
    h.commands.register(
        "qmp_capabilities",
        crate::qmp::Signature::NONE,
        capabilities,
    );
    assert_eq!(
        h.lines(r#"{"execute": "query-status"}"#),
        vec![r#"{"return": {"status": "paused", "singlestep": false, "running": false}}"#]
    );
    assert!(
        h.send(r#"{"execute": "qmp_capabilities"}"#)
            .contains("already complete")
    );
    let out = h.send(r#"{"execute": "query-commands"}"#);
    assert_eq!(out.matches("\"query-status\"").count(), 1);
    assert_eq!(out.matches("\"qmp_capabilities\"").count(), 1);
    assert!(h.commands.unregister("query-status"));
    assert!(
        h.send(r#"{"execute": "query-status"}"#)
            .contains("\"running\": true")
    );
}

#[test]
fn quit_replies_then_halts() {
    let mut h = Harness::negotiated();
    let (action, out) = h.feed(
        br#"{"execute": "quit", "id": "q"} {"execute": "x-nothing"} {"execute": "x-nothing"}"#,
    );
    assert_eq!(action, Action::Quit);
    assert_eq!(out, "{\"return\": {}, \"id\": \"q\"}\r\n");
    assert_eq!(h.ctx.calls, 0);
    // quit with arguments is refused and does not quit
    let (action, out) = h.feed(br#"{"execute": "quit", "arguments": {"now": true}}"#);
    assert_eq!(action, Action::Continue);
    assert_eq!(
        split_lines(&out),
        vec![generic("Parameter 'now' is unexpected")]
    );
    // quit is refused before negotiation
    let mut h = Harness::new();
    let (action, out) = h.feed(br#"{"execute": "quit"}"#);
    assert_eq!(action, Action::Continue);
    assert_eq!(split_lines(&out), vec![NEGOTIATE]);
}

#[test]
fn events() {
    let mut h = Harness::new();
    let ts = Timestamp {
        seconds: 1_700_000_000,
        microseconds: 42,
    };
    // Not sent before negotiation.
    assert!(
        !h.session
            .event("SHUTDOWN", Some(json!({"guest": false})), ts)
    );
    assert!(!h.session.has_output());
    let mut h = Harness::negotiated();
    assert!(h.session.event(
        "SHUTDOWN",
        Some(json!({"guest": false, "reason": "host-qmp-quit"})),
        ts
    ));
    assert!(h.session.event("RESUME", None, ts));
    let event = Event::new(
        "BLOCK_JOB_READY",
        Some(
            json!({"device": "m0", "len": 67108864, "offset": 67108864, "speed": 0, "type": "mirror"}),
        ),
        Timestamp::from_micros(1_500_000),
    );
    assert!(h.session.emit(&event));
    let lines = split_lines(&String::from_utf8(h.session.take_output()).unwrap());
    assert_eq!(
        lines,
        vec![
            r#"{"timestamp": {"seconds": 1700000000, "microseconds": 42}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}"#,
            r#"{"timestamp": {"seconds": 1700000000, "microseconds": 42}, "event": "RESUME"}"#,
            r#"{"timestamp": {"seconds": 1, "microseconds": 500000}, "event": "BLOCK_JOB_READY", "data": {"device": "m0", "len": 67108864, "offset": 67108864, "speed": 0, "type": "mirror"}}"#,
        ]
    );
    // The hand-written envelope is the writer's QDict order.
    assert_eq!(lines[2], json::to_string(&event.to_value()));
}

#[test]
fn events_raised_by_a_command_precede_its_reply() {
    let mut h = Harness::negotiated();
    assert_eq!(
        h.lines(r#"{"execute": "x-raise", "id": 9}"#),
        vec![
            r#"{"timestamp": {"seconds": 10, "microseconds": 20}, "event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "j0"}}"#,
            r#"{"timestamp": {"seconds": 10, "microseconds": 20}, "event": "STOP"}"#,
            r#"{"return": {}, "id": 9}"#,
        ]
    );
}

#[test]
fn timestamps() {
    assert_eq!(
        Timestamp::from_micros(-1),
        Timestamp {
            seconds: -1,
            microseconds: 999_999
        }
    );
    assert_eq!(
        Timestamp::from_micros(2_000_001),
        Timestamp {
            seconds: 2,
            microseconds: 1
        }
    );
}

#[test]
fn error_type() {
    let e = QmpError::device_not_found("Device 'x' not found");
    assert_eq!(
        serde_json::to_string(&e).unwrap(),
        r#"{"class":"DeviceNotFound","desc":"Device 'x' not found"}"#
    );
    assert_eq!(ErrorClass::KVMMissingCap.as_str(), "KVMMissingCap");
    assert_eq!(format!("{}", QmpError::generic("boom")), "boom");
    assert_eq!(
        QmpError::invalid_parameter_value("size", "uint64").desc,
        "Parameter 'size' expects uint64"
    );
    assert_eq!(
        QmpError::invalid_parameter("x").desc,
        "Invalid parameter 'x'"
    );
}

/// `feed_within` runs requests only while less output than its budget
/// waits; the rest stay queued, in order, and run on later calls without
/// input once the output has been taken.
#[test]
fn feed_within_holds_requests_back_while_output_waits() {
    let mut h = Harness::negotiated();
    let input: String = (0..5)
        .map(|i| alloc::format!(r#"{{"execute": "query-version", "id": {i}}}"#))
        .collect();
    let one = h.lines(r#"{"execute": "query-version"}"#)[0].len() + 2;
    // Room for two replies: the third is not run.
    let budget = 2 * one;
    let action = h
        .session
        .feed_within(input.as_bytes(), &h.commands, &mut h.ctx, budget);
    assert_eq!(action, Action::Continue);
    assert_eq!(
        split_lines(&String::from_utf8(h.session.take_output()).unwrap()).len(),
        2
    );
    assert!(h.session.has_queued());
    // Nothing runs while the budget is spent.
    let _ = h.session.feed_within(b"", &h.commands, &mut h.ctx, 0);
    assert!(!h.session.has_output());
    let mut ids = alloc::vec::Vec::new();
    while h.session.has_queued() {
        let _ = h.session.feed_within(b"", &h.commands, &mut h.ctx, 1);
        let out = String::from_utf8(h.session.take_output()).unwrap();
        let lines = split_lines(&out);
        assert_eq!(lines.len(), 1, "{out}");
        ids.push(serde_json::from_str::<serde_json::Value>(&lines[0]).unwrap()["id"].clone());
    }
    assert_eq!(ids, [2, 3, 4].map(serde_json::Value::from));
}
