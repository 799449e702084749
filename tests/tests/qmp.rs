//! QMP on COM2 of the booted appliance, checked with the shapes and texts
//! QEMU uses.

use harness::{Appliance, QemuConfig};
use serde_json::{Value, json};
use std::time::Duration;

fn start() -> Appliance {
    let image = harness::image::for_tests();
    let mut a = Appliance::start(&image, &QemuConfig::default()).expect("QEMU starts");
    a.qmp().read_greeting().expect("greeting");
    a
}

#[test]
fn greeting_and_negotiation() {
    let mut a = start();
    let greeting = a.qmp().greeting.clone().unwrap();
    assert_eq!(
        greeting["QMP"]["capabilities"],
        json!(["oob"]),
        "{greeting}"
    );
    assert_eq!(
        greeting["QMP"]["version"]["qemu"]["major"],
        json!(7),
        "{greeting}"
    );
    assert_eq!(
        greeting["QMP"]["version"]["package"],
        json!(format!("blockhaus {}", env!("CARGO_PKG_VERSION")))
    );

    // Before negotiation every command fails with CommandNotFound.
    let r = a.qmp().execute("query-version", Value::Null).unwrap();
    assert_eq!(r["error"]["class"], "CommandNotFound", "{r}");
    assert_eq!(
        r["error"]["desc"], "Expecting capabilities negotiation with 'qmp_capabilities'",
        "{r}"
    );

    assert_eq!(
        a.qmp().cmd("qmp_capabilities", Value::Null).unwrap(),
        json!({})
    );
    let v = a.qmp().cmd("query-version", Value::Null).unwrap();
    assert_eq!(
        v, greeting["QMP"]["version"],
        "query-version equals the greeting's version"
    );

    let again = a.qmp().execute("qmp_capabilities", Value::Null).unwrap();
    assert_eq!(again["error"]["class"], "CommandNotFound", "{again}");
}

#[test]
fn replies_echo_ids_and_report_errors_like_qemu() {
    let mut a = start();
    a.qmp().negotiate().unwrap();
    for id in [json!(1), json!("abc"), json!({"nested": [1, 2]})] {
        let r = a
            .qmp()
            .request(&json!({"execute": "query-status", "id": id}))
            .unwrap();
        assert_eq!(r["id"], id, "{r}");
        assert_eq!(r["return"]["status"], "running", "{r}");
        assert_eq!(r["return"]["running"], true, "{r}");
    }
    let r = a
        .qmp()
        .request(&json!({"execute": "no-such-command", "id": 7}))
        .unwrap();
    assert_eq!(
        r,
        json!({"error": {"class": "CommandNotFound", "desc": "The command no-such-command has not been found"}, "id": 7})
    );

    let r = a
        .qmp()
        .execute("query-version", json!({"bogus": 1}))
        .unwrap();
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert_eq!(r["error"]["desc"], "Parameter 'bogus' is unexpected", "{r}");

    let r = a.qmp().request(&json!({"execute": 42})).unwrap();
    assert_eq!(
        r["error"]["desc"], "QMP input member 'execute' must be a string",
        "{r}"
    );
    let r = a
        .qmp()
        .request(&json!({"execute": "query-status", "arguments": []}))
        .unwrap();
    assert_eq!(
        r["error"]["desc"], "QMP input member 'arguments' must be an object",
        "{r}"
    );
    let r = a.qmp().request(&json!([1, 2])).unwrap();
    assert_eq!(r["error"]["desc"], "QMP input must be a JSON object", "{r}");

    let names: Vec<String> = a
        .qmp()
        .cmd("query-commands", Value::Null)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    for want in [
        "qmp_capabilities",
        "query-version",
        "query-status",
        "query-commands",
        "quit",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "query-commands lacks {want}: {names:?}"
        );
    }
}

#[test]
fn malformed_json_and_garbage_get_errors_and_the_monitor_keeps_working() {
    let mut a = start();
    a.qmp().negotiate().unwrap();
    a.qmp()
        .send_raw(b"{\"execute\": \"query-status\", }\n")
        .unwrap();
    let r = a.qmp().recv_reply().unwrap();
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("JSON parse error"),
        "{r}"
    );
    assert_eq!(
        a.qmp().cmd("query-status", Value::Null).unwrap()["status"],
        "running"
    );

    // Random bytes, NULs, invalid UTF-8, unbalanced braces: whatever errors
    // come back, the appliance must stay up and answer afterwards.
    let mut seed: u64 = 0x5eed_b10c;
    let mut junk = Vec::new();
    for _ in 0..4096 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        junk.push((seed >> 33) as u8);
    }
    junk.extend_from_slice(b"\x00\xff\xfe}}]]{{[[\"\\u12");
    a.qmp().send_raw(&junk).unwrap();
    // Close any open string/structure so the lexer resynchronises, then ask.
    a.qmp().send_raw(b"\"}]}]}]}]}\n").unwrap();
    a.qmp().set_timeout(Duration::from_secs(10)).unwrap();
    let mut answered = false;
    for attempt in 0..20 {
        a.qmp()
            .send_raw(
                format!("{{\"execute\": \"query-status\", \"id\": \"after-{attempt}\"}}\n")
                    .as_bytes(),
            )
            .unwrap();
        // Drain replies until ours (errors for the junk may come first).
        for _ in 0..200 {
            let Ok(r) = a.qmp().recv_reply() else { break };
            if r["id"] == json!(format!("after-{attempt}")) {
                assert_eq!(r["return"]["status"], "running", "{r}");
                answered = true;
                break;
            }
        }
        if answered {
            break;
        }
    }
    assert!(
        answered,
        "the monitor did not answer after garbage; console:\n{}",
        a.console()
    );
}

#[test]
fn quit_replies_then_emits_shutdown_with_a_timestamp() {
    let mut a = start();
    a.qmp().negotiate().unwrap();
    let r = a
        .qmp()
        .request(&json!({"execute": "quit", "id": "bye"}))
        .unwrap();
    assert_eq!(r, json!({"return": {}, "id": "bye"}));
    let ev = a
        .qmp()
        .wait_event("SHUTDOWN", Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        ev["data"],
        json!({"guest": false, "reason": "host-qmp-quit"}),
        "{ev}"
    );
    let secs = ev["timestamp"]["seconds"].as_i64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (secs - now).abs() < 120,
        "event timestamp {secs} is not wall-clock time (host: {now})"
    );
    let us = ev["timestamp"]["microseconds"].as_i64().unwrap();
    assert!((0..1_000_000).contains(&us), "{ev}");
    let status = a.wait_exit(Duration::from_secs(30)).expect("QEMU exits");
    assert_eq!(status.code(), Some(0));
}
