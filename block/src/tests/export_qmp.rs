//! The NBD QMP commands and boot options ([`crate::export::qmp`]) over a
//! stand-in for the platform's listening sockets.

use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::{RefCell, RefMut};
use serde_json::{Value, json};

use super::harness::Qmp;
use crate::export::{ExportTable, NbdContext, NbdServer, ServerConfig};
use crate::layer::{BlockContext, BlockLayer};
use crate::qmp::{Args, Dispatcher, QmpError};

/// The platform's sockets, as the QMP commands see them.
struct Sockets {
    exports: Rc<ExportTable>,
    listening: Option<ServerConfig>,
}

impl NbdServer for Sockets {
    fn start(&mut self, cfg: ServerConfig) -> Result<(), String> {
        if self.listening.is_some() {
            return Err("NBD server already running".into());
        }
        self.listening = Some(cfg);
        Ok(())
    }
    fn stop(&mut self) -> Result<(), String> {
        if self.listening.take().is_none() {
            return Err("NBD server not running".into());
        }
        for e in self.exports.all() {
            e.request_shutdown(true);
        }
        self.exports.reap();
        Ok(())
    }
    fn running(&self) -> bool {
        self.listening.is_some()
    }
    fn exports(&self) -> Option<Rc<ExportTable>> {
        Some(self.exports.clone())
    }
}

/// A monitor holding the block layer and the NBD server.
struct Monitor {
    q: Qmp,
    server: RefCell<Sockets>,
}

impl BlockContext for Monitor {
    fn block_layer(&mut self) -> &mut BlockLayer {
        &mut self.q.bl
    }
}

impl crate::qmp::QmpContext for Monitor {}

impl NbdContext for Monitor {
    fn nbd_server(&self) -> RefMut<'_, dyn NbdServer> {
        self.server.borrow_mut()
    }
}

struct Harness {
    m: Monitor,
    d: Dispatcher<Monitor>,
}

impl Harness {
    fn new() -> Harness {
        let q = Qmp::new();
        let exports = ExportTable::new(q.bl.registry().clone());
        let mut d = Dispatcher::new();
        crate::commands::register(&mut d);
        crate::export::register(&mut d);
        let mut h = Harness {
            m: Monitor {
                q,
                server: RefCell::new(Sockets {
                    exports,
                    listening: None,
                }),
            },
            d,
        };
        for (name, size) in [("disk0", 1 << 20), ("ro0", 1 << 20)] {
            h.ok(
                "blockdev-add",
                json!({"driver": "mem", "node-name": name, "size": size, "label": name,
                       "read-only": name == "ro0"}),
            );
        }
        h
    }

    fn cmd(&mut self, name: &str, args: Value) -> Result<Value, QmpError> {
        let Value::Object(map) = args else {
            panic!("{args}")
        };
        self.d
            .call(name, &mut self.m, &Args::new(&map))
            .expect("command")
    }

    fn ok(&mut self, name: &str, args: Value) -> Value {
        match self.cmd(name, args.clone()) {
            Ok(v) => v,
            Err(e) => panic!("{name} {args}: {}", e.desc),
        }
    }

    fn err(&mut self, name: &str, args: Value) -> String {
        match self.cmd(name, args.clone()) {
            Ok(v) => panic!("{name} {args} succeeded: {v}"),
            Err(e) => e.desc,
        }
    }

    fn listening(&self) -> Option<(Option<core::net::Ipv4Addr>, u16, u32)> {
        let s = self.m.server.borrow();
        s.listening
            .as_ref()
            .map(|c| (c.host, c.port, c.max_connections))
    }

    fn handshake_max_seconds(&self) -> Option<u32> {
        let s = self.m.server.borrow();
        s.listening.as_ref().map(|c| c.handshake_max_seconds)
    }

    fn exports(&self) -> Rc<ExportTable> {
        self.m.server.borrow().exports.clone()
    }

    fn boot(&mut self, name: &str, value: &str) -> Result<bool, String> {
        crate::export::apply_boot_option(&mut self.m, name, value)
    }
}

#[test]
fn nbd_server_start_reads_both_address_shapes_and_refuses_what_it_cannot_serve() {
    let mut h = Harness::new();
    let inet = |host: &str| json!({"type": "inet", "host": host, "port": "10809"});
    assert_eq!(
        h.err(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "path": "/s"}})
        ),
        "blockhaus serves NBD over TCP only ('inet'), not 'unix'"
    );
    assert_eq!(
        h.err("nbd-server-start", json!({"addr": inet("example.org")})),
        "address resolution failed for example.org:10809: Name or service not known"
    );
    assert_eq!(
        h.err(
            "nbd-server-start",
            json!({"addr": {"type": "inet", "host": "::", "port": "nbd"}})
        ),
        "Port 'nbd' is not a number"
    );
    assert_eq!(
        h.err(
            "nbd-server-start",
            json!({"addr": inet("::"), "tls-creds": "tls0"})
        ),
        "No TLS credentials with id 'tls0'"
    );
    assert_eq!(
        h.err("nbd-server-start", json!({"addr": inet("::"), "x": 1})),
        "Parameter 'x' is unexpected"
    );
    assert_eq!(
        h.err("nbd-server-stop", json!({})),
        "NBD server not running"
    );

    // QMP's legacy shape, typed.
    h.ok(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "10.0.2.15", "port": 10810}},
               "max-connections": 4}),
    );
    assert_eq!(
        h.listening(),
        Some((Some(core::net::Ipv4Addr::new(10, 0, 2, 15)), 10810, 4))
    );
    assert_eq!(
        h.err("nbd-server-start", json!({"addr": inet("")})),
        "NBD server already running"
    );
    h.ok("nbd-server-stop", json!({}));

    // The boot option: keyval strings, the flat shape.
    assert_eq!(
        h.boot(
            "nbd-server",
            "addr.type=inet,addr.host=0.0.0.0,addr.port=10809"
        ),
        Ok(true)
    );
    // QEMU's defaults since the CVE-2024-7409 fix: 100 clients, 10 s to
    // finish the handshake.
    assert_eq!(h.listening(), Some((None, 10809, 100)));
    assert_eq!(h.handshake_max_seconds(), Some(10));
    h.ok("nbd-server-stop", json!({}));

    // Both limits given, 0 meaning none (keyval and QMP).
    assert_eq!(
        h.boot(
            "nbd-server",
            "addr.type=inet,addr.host=0.0.0.0,addr.port=10809,max-connections=0,\
             handshake-max-seconds=0"
        ),
        Ok(true)
    );
    assert_eq!(h.listening(), Some((None, 10809, 0)));
    assert_eq!(h.handshake_max_seconds(), Some(0));
    h.ok("nbd-server-stop", json!({}));
    h.ok(
        "nbd-server-start",
        json!({"addr": inet(""), "handshake-max-seconds": 3}),
    );
    assert_eq!(h.handshake_max_seconds(), Some(3));
    h.ok("nbd-server-stop", json!({}));
    assert_eq!(
        h.err(
            "nbd-server-start",
            json!({"addr": inet(""), "handshake-max-seconds": 4294967296u64})
        ),
        "Parameter 'handshake-max-seconds' expects uint32"
    );
    assert_eq!(h.boot("blockdev", "driver=mem"), Ok(false));
}

/// QEMU offers `NBD_FLAG_CAN_MULTI_CONN` unless the server takes a single
/// connection (`max-connections=1`): a client told it may open several
/// connections would otherwise wait on the second one forever.
#[test]
fn multi_conn_is_offered_unless_the_server_takes_one_connection() {
    use crate::nbd::ExportSet;
    let mut h = Harness::new();
    let multi_conn = |h: &Harness| {
        let table = h.m.server.borrow().exports.clone();
        table.find("d").expect("export d").features.multi_conn
    };
    for (max, offered) in [(1u32, false), (2, true), (0, true)] {
        h.ok(
            "nbd-server-start",
            json!({"addr": {"type": "inet", "host": "0.0.0.0", "port": "10809"},
                   "max-connections": max}),
        );
        h.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "disk0", "name": "d",
                   "writable": true}),
        );
        assert_eq!(multi_conn(&h), offered, "max-connections={max}");
        h.ok("nbd-server-stop", json!({}));
    }
}

#[test]
fn block_export_add_del_and_query_with_qemus_texts() {
    let mut h = Harness::new();
    let add = json!({"type": "nbd", "id": "e0", "node-name": "disk0", "writable": true});
    assert_eq!(
        h.err("block-export-add", add.clone()),
        "NBD server not running"
    );
    h.ok(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "host": "", "port": "10809"}}),
    );
    assert_eq!(
        h.err(
            "block-export-add",
            json!({"type": "fuse", "id": "e0", "node-name": "disk0"})
        ),
        "No driver found for the requested export type"
    );
    assert_eq!(
        h.err(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "disk0", "iothread": "io0"})
        ),
        "iothread \"io0\" not found"
    );
    assert_eq!(
        h.err(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "disk0", "bitmaps": ["b0"]})
        ),
        "Bitmap 'b0' is not found"
    );
    assert_eq!(
        h.err(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "disk0", "bitmaps": [7]})
        ),
        "Invalid parameter type for 'bitmaps[0]', expected: BlockDirtyBitmapOrStr"
    );
    assert_eq!(
        h.err(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "ro0", "writable": true})
        ),
        "Cannot export read-only node as writable"
    );
    h.ok("block-export-add", add.clone());
    assert_eq!(
        h.err("block-export-add", add),
        "Block export id 'e0' is already in use"
    );
    assert_eq!(
        h.boot(
            "export",
            "type=nbd,id=e1,node-name=ro0,name=ro,writable=off"
        ),
        Ok(true)
    );
    assert_eq!(
        h.ok("query-block-exports", json!({})),
        json!([
            {"type": "nbd", "id": "e0", "node-name": "disk0", "shutting-down": false, "x-clients": 0},
            {"type": "nbd", "id": "e1", "node-name": "ro0", "shutting-down": false, "x-clients": 0},
        ])
    );
    assert!(h.exports().by_name("ro").is_some());

    assert_eq!(
        h.err("block-export-del", json!({"id": "nope"})),
        "Export 'nope' is not found"
    );
    let e0 = h.exports().by_id("e0").unwrap();
    e0.clients.set(1);
    assert_eq!(h.ok("query-block-exports", json!({}))[0]["x-clients"], 1);
    assert_eq!(
        h.err("block-export-del", json!({"id": "e0"})),
        "export 'e0' still in use"
    );
    h.ok("block-export-del", json!({"id": "e0", "mode": "hard"}));
    assert!(e0.hard.get());
    assert_eq!(
        h.err("block-export-del", json!({"id": "e0"})),
        "Export 'e0' is already shutting down"
    );
    assert_eq!(
        h.ok("query-block-exports", json!({}))[0]["shutting-down"],
        true
    );
    e0.clients.set(0);
    h.ok("block-export-del", json!({"id": "e1"}));
    h.m.q.settle();
    assert_eq!(h.ok("query-block-exports", json!({})), json!([]));
    assert_eq!(
        h.m.q
            .events()
            .into_iter()
            .map(|(n, d)| (n, d["id"].clone()))
            .collect::<Vec<_>>(),
        [
            ("BLOCK_EXPORT_DELETED".to_string(), json!("e0")),
            ("BLOCK_EXPORT_DELETED".to_string(), json!("e1")),
        ]
    );
}

#[test]
fn legacy_nbd_server_add_and_remove() {
    let mut h = Harness::new();
    h.ok(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "host": "", "port": "10809"}}),
    );
    // A read-only node is quietly exported read-only.
    h.ok(
        "nbd-server-add",
        json!({"device": "ro0", "name": "ro", "writable": true}),
    );
    let ro = h.exports().by_id("ro").unwrap();
    assert!(!ro.writable && ro.name == "ro" && ro.node_name == "ro0");
    h.ok(
        "nbd-server-add",
        json!({"device": "disk0", "writable": true}),
    );
    assert!(h.exports().by_name("disk0").unwrap().writable);
    assert_eq!(
        h.err(
            "nbd-server-add",
            json!({"device": "disk0", "name": "d2", "bitmap": "b0"})
        ),
        "Bitmap 'b0' is not found"
    );
    h.ok("nbd-server-remove", json!({"name": "ro"}));
    assert!(h.exports().by_id("ro").is_none());

    // Stopping the server asks every export to go.
    h.ok("nbd-server-stop", json!({}));
    h.m.q.settle();
    assert!(h.exports().all().is_empty());
    assert_eq!(
        h.err("nbd-server-add", json!({"device": "disk0"})),
        "NBD server not running"
    );
}

/// Checks that `value` has the shape `query-qmp-schema` gives type `ty`:
/// every mandatory member present, no member the schema lacks, enum values
/// among the listed ones, lists and built-ins of the right JSON type.
fn conforms(schema: &[Value], ty: &str, value: &Value, path: &str) {
    let t = crate::qmp::tests::schema::entity(schema, ty);
    match t["meta-type"].as_str().unwrap() {
        "builtin" => {
            let ok = match t["json-type"].as_str().unwrap() {
                "string" => value.is_string(),
                "int" => value.is_i64() || value.is_u64(),
                "number" => value.is_number(),
                "boolean" => value.is_boolean(),
                "null" => value.is_null(),
                _ => true,
            };
            assert!(ok, "{path}: {value} is not a {ty}");
        }
        "enum" => assert!(
            t["values"].as_array().unwrap().contains(value),
            "{path}: {value} is not one of {}",
            t["values"]
        ),
        "array" => {
            let elem = t["element-type"].as_str().unwrap();
            for (i, v) in value.as_array().expect(path).iter().enumerate() {
                conforms(schema, elem, v, &alloc::format!("{path}[{i}]"));
            }
        }
        "object" => {
            let obj = value
                .as_object()
                .unwrap_or_else(|| panic!("{path}: {value}"));
            let members = t["members"].as_array().unwrap();
            for m in members {
                let name = m["name"].as_str().unwrap();
                match obj.get(name) {
                    Some(v) => conforms(
                        schema,
                        m["type"].as_str().unwrap(),
                        v,
                        &alloc::format!("{path}.{name}"),
                    ),
                    None => assert!(m.get("default").is_some(), "{path}: {name} is missing"),
                }
            }
            for key in obj.keys() {
                assert!(
                    members.iter().any(|m| m["name"] == key.as_str()),
                    "{path}: {key} is not in the schema"
                );
            }
        }
        other => panic!("{path}: meta-type {other}"),
    }
}

#[test]
fn query_qmp_schema_is_the_dispatchers_table_and_describes_what_the_commands_return() {
    use crate::qmp::tests::schema::{assert_closed, entity};
    use crate::qmp::{ErrorClass, Session, VersionInfo};
    let mut h = Harness::new();
    let mut s = Session::new(VersionInfo::new(7, 2, 0));
    let mut run = |h: &mut Harness, input: &str| -> Value {
        let _ = s.feed(input.as_bytes(), &h.d, &mut h.m);
        let out = String::from_utf8(s.take_output()).unwrap();
        serde_json::from_str(out.trim_end()).unwrap()
    };
    run(&mut h, r#"{"execute": "qmp_capabilities"}"#);
    let schema: Vec<Value> = run(&mut h, r#"{"execute": "query-qmp-schema"}"#)["return"]
        .as_array()
        .unwrap()
        .clone();
    assert_closed(&schema);
    let mut in_schema: Vec<String> = schema
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    in_schema.sort();
    let mut listed: Vec<String> = run(&mut h, r#"{"execute": "query-commands"}"#)["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    listed.sort();
    assert_eq!(in_schema, listed);
    // Every command in the schema is accepted by the dispatcher (an
    // argument it cannot take fails the argument check, not the lookup),
    // and a name outside it is not.
    for name in &in_schema {
        if name == "quit" || name == "qmp_capabilities" {
            continue;
        }
        let r = run(
            &mut h,
            &alloc::format!(r#"{{"execute": "{name}", "arguments": {{"x-no-such-argument": 1}}}}"#),
        );
        assert_eq!(r["error"]["class"], "GenericError", "{name}: {r}");
    }
    let r = run(&mut h, r#"{"execute": "x-not-in-schema"}"#);
    assert_eq!(r["error"]["class"], ErrorClass::CommandNotFound.as_str());
    assert!(!in_schema.iter().any(|n| n == "x-not-in-schema"));

    // blockdev-add: the base of BlockdevOptions, driver an enum of drivers.
    let add = entity(&schema, "blockdev-add");
    let arg = entity(&schema, add["arg-type"].as_str().unwrap());
    let driver = &arg["members"][0];
    assert_eq!(driver["name"], "driver");
    assert!(driver.get("default").is_none());
    let drivers = entity(&schema, driver["type"].as_str().unwrap());
    assert_eq!(drivers["meta-type"], "enum");
    for d in ["raw", "qcow2", "virtio-blk", "null-co", "quorum"] {
        assert!(
            drivers["values"].as_array().unwrap().contains(&json!(d)),
            "{d}"
        );
    }
    let node_name = arg["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "node-name")
        .unwrap();
    assert_eq!(node_name["type"], "str");
    assert_eq!(node_name["default"], Value::Null);

    // What the queries return has the shape the schema says.
    run(
        &mut h,
        r#"{"execute": "nbd-server-start", "arguments": {"addr": {"type": "inet", "data": {"host": "", "port": "10809"}}}}"#,
    );
    run(
        &mut h,
        r#"{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "disk0"}}"#,
    );
    for q in [
        "query-named-block-nodes",
        "query-block",
        "x-debug-query-block-graph",
        "query-block-exports",
        "query-blockstats",
        "query-jobs",
        "query-block-jobs",
        "query-version",
        "query-status",
        "query-commands",
    ] {
        let ret = entity(&schema, q)["ret-type"].as_str().unwrap().to_string();
        let value = run(&mut h, &alloc::format!(r#"{{"execute": "{q}"}}"#))["return"].clone();
        if matches!(
            q,
            "query-named-block-nodes" | "query-block-exports" | "query-blockstats"
        ) {
            assert!(
                value.as_array().is_some_and(|a| !a.is_empty()),
                "{q}: {value}"
            );
        }
        conforms(&schema, &ret, &value, q);
    }
    let nodes = entity(&schema, "query-named-block-nodes");
    let list = entity(&schema, nodes["ret-type"].as_str().unwrap());
    assert_eq!(list["meta-type"], "array");
    let info = entity(&schema, list["element-type"].as_str().unwrap());
    assert!(
        info["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "node-name")
    );
}

#[test]
fn an_exports_backend_is_listed_by_query_blockstats_with_the_export_as_qdev() {
    let mut h = Harness::new();
    h.ok(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "host": "", "port": "10809"}}),
    );
    h.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "disk0", "writable": true}),
    );
    let e = h.exports().by_id("e0").unwrap();
    let backend = e.backend.clone();
    h.m.q
        .bl
        .wait(async move {
            backend
                .write(512, alloc::vec![7; 1024], crate::io::ReqFlags::NONE)
                .await
        })
        .unwrap()
        .unwrap();
    let stats = h.ok("query-blockstats", json!({}));
    let list = stats.as_array().unwrap();
    assert_eq!(list.len(), 1, "{stats}");
    assert_eq!(list[0]["device"], "");
    assert_eq!(list[0]["qdev"], "e0");
    assert_eq!(list[0]["node-name"], "disk0");
    assert_eq!(list[0]["stats"]["wr_bytes"], 1024);
    assert_eq!(list[0]["stats"]["wr_highest_offset"], 1536);
    h.ok(
        "block-latency-histogram-set",
        json!({"id": "e0", "boundaries": [1]}),
    );
}

#[test]
fn x_stats_intervals_give_an_exports_blockstats_timed_stats() {
    let mut h = Harness::new();
    h.ok(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "host": "0.0.0.0", "port": "10809"}}),
    );
    assert_eq!(
        h.err(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "disk0",
                   "x-stats-intervals": [60, 0]}),
        ),
        "Invalid interval length: 0"
    );
    assert_eq!(
        h.err(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "disk0",
                   "x-stats-intervals": 60}),
        ),
        "Invalid parameter type for 'x-stats-intervals', expected: array"
    );
    h.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "disk0",
               "x-stats-intervals": [60, 3600]}),
    );
    assert_eq!(
        h.boot(
            "export",
            "type=nbd,id=e1,node-name=ro0,x-stats-intervals.0=5"
        ),
        Ok(true)
    );
    let stats = h.ok("query-blockstats", json!({}));
    let timed = |qdev: &str| -> Vec<Value> {
        let entry = stats
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["qdev"] == qdev)
            .unwrap_or_else(|| panic!("no {qdev} in {stats}"));
        entry["stats"]["timed_stats"].as_array().unwrap().clone()
    };
    let lengths = |qdev: &str| -> Vec<Value> {
        timed(qdev)
            .iter()
            .map(|t| t["interval_length"].clone())
            .collect()
    };
    assert_eq!(lengths("e0"), alloc::vec![json!(3600), json!(60)]);
    assert_eq!(lengths("e1"), alloc::vec![json!(5)]);
}

/// `object-add` runs the platform's check of a `tls-creds-x509` object's
/// PEM text: its error is the command's, and the object is not added.
#[test]
fn tls_creds_object_add_runs_the_platform_check() {
    let mut h = Harness::new();
    h.m.q.bl.set_tls_creds_check(alloc::rc::Rc::new(|c| {
        if c.server_key == "KEY" {
            Ok(())
        } else {
            Err(alloc::format!(
                "Unable to parse the server key: {}",
                c.server_key
            ))
        }
    }));
    let creds = |id: &str, key: &str| {
        json!({"qom-type": "tls-creds-x509", "id": id, "endpoint": "server",
               "verify-peer": false, "x-server-cert": "CERT", "x-server-key": key})
    };
    assert_eq!(
        h.err("object-add", creds("tls0", "junk")),
        "Unable to parse the server key: junk"
    );
    // Not added: the id is free, and naming it finds nothing.
    let addr = json!({"type": "inet", "host": "::", "port": "10809"});
    assert_eq!(
        h.err(
            "nbd-server-start",
            json!({"addr": addr, "tls-creds": "tls0"})
        ),
        "No TLS credentials with id 'tls0'"
    );
    h.ok("object-add", creds("tls0", "KEY"));
}

/// `tls-creds-x509` objects (QMP and `--object`), and `tls-creds` naming
/// them: QEMU's errors for a missing id and for an object of another type,
/// `dir` and client endpoints refused, `tls-authz` refused.
#[test]
fn tls_creds_objects_and_nbd_server_start() {
    let mut h = Harness::new();
    let creds = |extra: Value| {
        let mut m = json!({"qom-type": "tls-creds-x509", "id": "tls0", "endpoint": "server",
                           "x-ca-cert": "CA", "x-server-cert": "CERT", "x-server-key": "KEY"});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                m.as_object_mut().unwrap().remove(k);
            } else {
                m[k] = v.clone();
            }
        }
        m
    };
    assert_eq!(
        h.err("object-add", creds(json!({"endpoint": null}))),
        "blockhaus has no TLS client: tls-creds-x509 takes endpoint=server only"
    );
    assert_eq!(
        h.err("object-add", creds(json!({"dir": "/etc/pki/qemu"}))),
        "blockhaus has no filesystem to read 'dir' from: give the PEM text inline \
         with 'x-ca-cert', 'x-server-cert' and 'x-server-key'"
    );
    assert_eq!(
        h.err("object-add", creds(json!({"x-ca-cert": null}))),
        "Unable to access credentials: 'x-ca-cert' (PEM text) is required"
    );
    assert_eq!(
        h.err("object-add", creds(json!({"x-server-key": null}))),
        "Unable to access credentials: 'x-server-key' (PEM text) is required"
    );
    assert_eq!(
        h.err("object-add", creds(json!({"priority": "NORMAL"}))),
        "Parameter 'priority' is unexpected"
    );
    // Without verify-peer no CA is needed.
    h.ok(
        "object-add",
        creds(json!({"id": "noverify", "verify-peer": false, "x-ca-cert": null})),
    );
    h.ok("object-add", creds(json!({})));
    h.ok(
        "object-add",
        json!({"qom-type": "throttle-group", "id": "tg0"}),
    );
    let addr = json!({"type": "inet", "host": "::", "port": "10809"});
    assert_eq!(
        h.err(
            "nbd-server-start",
            json!({"addr": addr, "tls-creds": "tg0"})
        ),
        "Object with id 'tg0' is not TLS credentials"
    );
    assert_eq!(
        h.err(
            "nbd-server-start",
            json!({"addr": addr, "tls-authz": "authz0"})
        ),
        "'tls-authz' needs 'tls-creds'"
    );
    assert_eq!(
        h.err(
            "nbd-server-start",
            json!({"addr": addr, "tls-creds": "tls0", "tls-authz": "authz0"})
        ),
        "Cannot find QAuthZ object ID authz0"
    );
    assert_eq!(
        h.err(
            "nbd-server-start",
            json!({"addr": addr, "tls-creds": "tls0", "tls-authz": "tg0"})
        ),
        "Object 'tg0' is not a QAuthZ subclass"
    );
    assert_eq!(
        h.err(
            "object-add",
            json!({"qom-type": "authz-simple", "id": "authz0"})
        ),
        "Parameter 'identity' is missing"
    );
    assert_eq!(
        h.err(
            "object-add",
            json!({"qom-type": "authz-list", "id": "authz0"})
        ),
        "Parameter 'qom-type' does not accept value 'authz-list'"
    );
    h.ok(
        "object-add",
        json!({"qom-type": "authz-simple", "id": "authz0", "identity": "CN=client,O=blockhaus"}),
    );
    assert!(h.listening().is_none());
    h.ok(
        "nbd-server-start",
        json!({"addr": addr, "tls-creds": "tls0", "tls-authz": "authz0"}),
    );
    assert_eq!(
        h.m.server
            .borrow()
            .listening
            .as_ref()
            .unwrap()
            .tls_authz
            .as_deref(),
        Some("CN=client,O=blockhaus")
    );
    h.ok("nbd-server-stop", json!({}));
    assert!(h.listening().is_none());
    h.ok(
        "nbd-server-start",
        json!({"addr": addr, "tls-creds": "tls0"}),
    );
    {
        let s = h.m.server.borrow();
        let tls = s.listening.as_ref().unwrap().tls.as_ref().unwrap();
        assert!(tls.verify_peer);
        assert_eq!(tls.ca_cert.as_deref(), Some("CA"));
        assert_eq!(tls.server_cert, "CERT");
        assert_eq!(tls.server_key, "KEY");
    }
    h.ok("nbd-server-stop", json!({}));
    h.ok("object-del", json!({"id": "tls0"}));
    assert_eq!(
        h.err(
            "nbd-server-start",
            json!({"addr": addr, "tls-creds": "tls0"})
        ),
        "No TLS credentials with id 'tls0'"
    );
    // The boot options: --object in keyval form, then --nbd-server.
    h.m.q
        .bl
        .boot_object(
            "tls-creds-x509,id=boot0,endpoint=server,verify-peer=off,x-server-cert=C,x-server-key=K",
        )
        .unwrap();
    h.boot(
        "nbd-server",
        "addr.type=inet,addr.host=::,addr.port=10809,tls-creds=boot0",
    )
    .unwrap();
    let s = h.m.server.borrow();
    let tls = s.listening.as_ref().unwrap().tls.as_ref().unwrap();
    assert!(!tls.verify_peer);
    assert_eq!(tls.ca_cert, None);
}
