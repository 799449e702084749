//! `query-qmp-schema` of the booted appliance, read by QEMU's own Python
//! QMP client (`qemu.qmp`, installed by `.ci/install-deps`), connected
//! straight to COM2's socket: QEMU holds the guest until the client is
//! there (`wait=on`), so the client sees the one greeting and negotiates
//! itself. `qmp-shell` (from the same package) runs commands the same way.

use harness::QemuConfig;
use serde_json::Value;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CLIENT: &str = r#"
import asyncio, json, sys
from qemu.qmp import QMPClient

async def main(path):
    c = QMPClient('blockhaus-test')
    await c.connect(path)
    out = {
        'commands': [x['name'] for x in await c.execute('query-commands')],
        'schema': await c.execute('query-qmp-schema'),
    }
    try:
        await c.execute('quit')
    except Exception:
        pass
    await c.disconnect()
    print(json.dumps(out))

asyncio.run(main(sys.argv[1]))
"#;

fn entity<'s>(schema: &'s [Value], name: &str) -> &'s Value {
    schema
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no entity {name} in the schema"))
}

fn member<'s>(schema: &'s [Value], object: &str, name: &str) -> &'s Value {
    entity(schema, object)["members"]
        .as_array()
        .expect("an object")
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("{object} has no member {name}"))
}

/// Boots the appliance with COM2 on a socket in `dir`, runs `client` on
/// that socket once QEMU listens, and returns the client's output after
/// QEMU exited 0 (the client ends with `quit`).
fn with_client(client: &mut Command) -> std::process::Output {
    let image = harness::image::for_tests();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut qemu = QemuConfig::default()
        .command(&image, &sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu starts");
    let t0 = Instant::now();
    while !sock.exists() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = client.arg(&sock).output().expect("the client runs");
    let status = qemu.wait().expect("qemu exits");
    assert!(
        out.status.success(),
        "{client:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(status.success(), "QEMU exit {status:?}");
    out
}

#[test]
fn qemu_qmp_reads_a_schema_of_every_command_with_its_types() {
    let client = with_client(Command::new("/usr/bin/python3").args(["-c", CLIENT]));
    let out: Value = serde_json::from_slice(&client.stdout).expect("the client's JSON");
    let schema = out["schema"].as_array().expect("a SchemaInfo list");

    // The schema's commands are exactly those query-commands lists, the
    // kernel's own included.
    let mut in_schema: Vec<&str> = schema
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    in_schema.sort_unstable();
    let mut listed: Vec<&str> = out["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    listed.sort_unstable();
    assert_eq!(in_schema, listed);
    for name in [
        "x-query-devices",
        "x-drive-add",
        "query-qmp-schema",
        "blockdev-add",
    ] {
        assert!(in_schema.contains(&name), "{name}");
    }

    // blockdev-add: driver (an enum of the block drivers), node-name
    // optional, returns {}.
    let add = entity(schema, "blockdev-add");
    let arg = add["arg-type"].as_str().unwrap();
    let driver = member(schema, arg, "driver");
    assert!(driver.get("default").is_none(), "driver is mandatory");
    let drivers = entity(schema, driver["type"].as_str().unwrap());
    assert_eq!(drivers["meta-type"], "enum");
    let values = drivers["values"].as_array().unwrap();
    for d in [
        "virtio-blk",
        "virtio-scsi",
        "raw",
        "qcow2",
        "null-co",
        "throttle",
    ] {
        assert!(values.iter().any(|v| v == d), "{d} in {values:?}");
    }
    let node_name = member(schema, arg, "node-name");
    assert_eq!(node_name["type"], "str");
    assert_eq!(node_name["default"], Value::Null);
    let ret = entity(schema, add["ret-type"].as_str().unwrap());
    assert_eq!(ret["meta-type"], "object");
    assert_eq!(ret["members"], serde_json::json!([]));

    // query-named-block-nodes: flat?:bool → [BlockDeviceInfo].
    let q = entity(schema, "query-named-block-nodes");
    let flat = member(schema, q["arg-type"].as_str().unwrap(), "flat");
    assert_eq!(flat["type"], "bool");
    let list = entity(schema, q["ret-type"].as_str().unwrap());
    assert_eq!(list["meta-type"], "array");
    let info = list["element-type"].as_str().unwrap();
    for (name, ty) in [
        ("node-name", "str"),
        ("drv", "str"),
        ("ro", "bool"),
        ("file", "str"),
    ] {
        assert_eq!(member(schema, info, name)["type"], ty, "{name}");
    }
    let image_info = member(schema, info, "image")["type"].as_str().unwrap();
    assert_eq!(member(schema, image_info, "virtual-size")["type"], "int");

    // Events and built-in types are there too.
    for e in ["SHUTDOWN", "JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED"] {
        assert_eq!(entity(schema, e)["meta-type"], "event", "{e}");
    }
    assert_eq!(entity(schema, "int")["json-type"], "int");
}

#[test]
fn qmp_shell_runs_commands_and_shows_qemus_errors() {
    let mut script = tempfile::NamedTempFile::new().unwrap();
    script
        .write_all(b"query-qmp-schema\nblock-latency-histogram-set id=nope\nquit\n")
        .unwrap();
    let input = std::fs::File::open(script.path()).unwrap();
    let out = with_client(Command::new("qmp-shell").stdin(input));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Connected to QEMU 7.2.0"), "{text}");
    assert!(text.contains(r#""name": "query-blockstats""#), "{text}");
    assert!(
        text.contains(
            r#"{"error": {"class": "DeviceNotFound", "desc": "Device 'nope' not found"}}"#
        ),
        "{text}"
    );
}
