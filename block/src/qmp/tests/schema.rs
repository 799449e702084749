//! Signatures: the notation, the argument checks the session runs before a
//! handler, and `query-qmp-schema`.

use super::*;
use crate::qmp::schema::{Member, Members, Ty, check_args, parse_members, parse_type};

#[test]
fn notation_parses_members_types_and_open_lists() {
    let m = parse_members("a:str, b?:[int], c:{x:bool}, d?:(on|off), e:@T, ..").unwrap();
    assert!(m.open);
    let names: Vec<(&str, bool)> = m.members.iter().map(|m| (m.name, m.optional)).collect();
    assert_eq!(
        names,
        [
            ("a", false),
            ("b", true),
            ("c", false),
            ("d", true),
            ("e", false)
        ]
    );
    assert_eq!(
        m.members[1].ty,
        Ty::List(alloc::boxed::Box::new(Ty::Builtin("int")))
    );
    assert_eq!(
        m.members[2].ty,
        Ty::Object(Members {
            members: alloc::vec![Member {
                name: "x",
                optional: false,
                ty: Ty::Builtin("bool")
            }],
            open: false
        })
    );
    assert_eq!(m.members[3].ty, Ty::Enum(alloc::vec!["on", "off"]));
    assert_eq!(m.members[4].ty, Ty::Named("T"));
    assert_eq!(
        parse_type("(a|b|..)").unwrap(),
        Ty::OpenEnum(alloc::vec!["a", "b"])
    );
    assert_eq!(parse_members("").unwrap(), Members::default());
    for bad in ["a", "a:", "a:strr", "a:[str", "a:str b:int", "a:(x|)"] {
        assert!(parse_members(bad).is_err(), "{bad}");
    }
}

fn check(spec: &'static str, args: Value) -> Result<(), String> {
    let Value::Object(map) = args else {
        panic!("not an object")
    };
    check_args(spec, &Args::new(&map)).map_err(|e| e.desc)
}

#[test]
fn checks_have_the_input_visitors_texts_in_declaration_order() {
    let spec = "device:str, speed?:int, mode?:(safe|hard), size?:uint64, tags?:[str], o?:{a:int}";
    assert_eq!(check(spec, json!({"device": "d"})), Ok(()));
    assert_eq!(
        check(spec, json!({"speed": 1})).unwrap_err(),
        "Parameter 'device' is missing"
    );
    assert_eq!(
        check(spec, json!({"device": 1})).unwrap_err(),
        "Invalid parameter type for 'device', expected: string"
    );
    assert_eq!(
        check(spec, json!({"device": "d", "speed": "x"})).unwrap_err(),
        "Invalid parameter type for 'speed', expected: integer"
    );
    assert_eq!(
        check(spec, json!({"device": "d", "mode": "soft"})).unwrap_err(),
        "Parameter 'mode' does not accept value 'soft'"
    );
    assert_eq!(
        check(spec, json!({"device": "d", "size": 1.5})).unwrap_err(),
        "Parameter 'size' expects uint64"
    );
    assert_eq!(
        check(spec, json!({"device": "d", "tags": ["a", 2]})).unwrap_err(),
        "Invalid parameter type for 'tags[1]', expected: string"
    );
    assert_eq!(
        check(spec, json!({"device": "d", "o": []})).unwrap_err(),
        "Invalid parameter type for 'o', expected: object"
    );
    // Leftovers come last, after every declared member was visited.
    assert_eq!(
        check(spec, json!({"zzz": 1, "device": 2})).unwrap_err(),
        "Invalid parameter type for 'device', expected: string"
    );
    assert_eq!(
        check(spec, json!({"device": "d", "zzz": 1})).unwrap_err(),
        "Parameter 'zzz' is unexpected"
    );
    // An open list leaves further members to the handler; an open enum
    // leaves the value to it.
    assert_eq!(
        check("driver:(a|..), ..", json!({"driver": "z", "x": 1})),
        Ok(())
    );
    assert_eq!(
        check("driver:(a|..), ..", json!({"driver": 1})).unwrap_err(),
        "Invalid parameter type for 'driver', expected: string"
    );
}

#[test]
fn the_session_checks_arguments_before_the_handler_runs() {
    let mut h = Harness::negotiated();
    assert_eq!(
        h.lines(r#"{"execute": "x-fail", "arguments": {"device": 1}}"#),
        alloc::vec![generic(
            "Invalid parameter type for 'device', expected: string"
        )]
    );
    let calls = h.ctx.calls;
    assert_eq!(
        h.lines(r#"{"execute": "x-nothing", "arguments": {"a": 1}}"#),
        alloc::vec![generic("Parameter 'a' is unexpected")]
    );
    assert_eq!(h.ctx.calls, calls, "the handler ran despite bad arguments");
}

/// `query-qmp-schema` over the session, as a list of `SchemaInfo`.
pub(crate) fn schema_of(lines: &[String]) -> Vec<Value> {
    let reply: Value = serde_json::from_str(&lines[0]).unwrap();
    reply["return"].as_array().expect("a list").clone()
}

/// Finds entity `name`.
pub(crate) fn entity<'s>(schema: &'s [Value], name: &str) -> &'s Value {
    schema
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no entity {name}"))
}

/// Checks that every type an entity names is defined, once.
pub(crate) fn assert_closed(schema: &[Value]) {
    let mut names: Vec<&str> = schema.iter().map(|e| e["name"].as_str().unwrap()).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len(), "an entity is defined twice");
    for e in schema {
        let mut refs: Vec<&Value> = Vec::new();
        for key in ["arg-type", "ret-type", "element-type"] {
            refs.extend(e.get(key));
        }
        if let Some(members) = e.get("members").and_then(Value::as_array) {
            refs.extend(members.iter().filter_map(|m| m.get("type")));
        }
        for r in refs {
            let r = r.as_str().expect("a type name");
            assert!(names.binary_search(&r).is_ok(), "{e}: {r} is not defined");
        }
    }
}

#[test]
fn query_qmp_schema_lists_every_command_event_and_type() {
    let mut h = Harness::negotiated();
    let schema = schema_of(&h.lines(r#"{"execute": "query-qmp-schema"}"#));
    assert_closed(&schema);
    let mut commands: Vec<&str> = schema
        .iter()
        .filter(|e| e["meta-type"] == "command")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    commands.sort_unstable();
    let mut expected: Vec<&str> = BUILTINS.iter().copied().chain(h.commands.names()).collect();
    expected.sort_unstable();
    assert_eq!(commands, expected);

    // x-fail: {"device": "str"} → {}.
    let fail = entity(&schema, "x-fail");
    let arg = entity(&schema, fail["arg-type"].as_str().unwrap());
    assert_eq!(arg["meta-type"], "object");
    assert_eq!(arg["members"], json!([{"name": "device", "type": "str"}]));
    let ret = entity(&schema, fail["ret-type"].as_str().unwrap());
    assert_eq!(ret["members"], json!([]));
    // qmp_capabilities: an optional list of an enum.
    let caps = entity(&schema, "qmp_capabilities");
    let arg = entity(&schema, caps["arg-type"].as_str().unwrap());
    let enable = &arg["members"][0];
    assert_eq!(enable["name"], "enable");
    assert_eq!(enable["default"], Value::Null);
    let list = entity(&schema, enable["type"].as_str().unwrap());
    assert_eq!(list["meta-type"], "array");
    let elem = entity(&schema, list["element-type"].as_str().unwrap());
    assert_eq!(elem["meta-type"], "enum");
    assert_eq!(elem["values"], json!(["oob"]));
    assert_eq!(elem["members"], json!([{"name": "oob"}]));
    // Built-ins, and the run-state events.
    assert_eq!(
        entity(&schema, "str"),
        &json!({"name": "str", "meta-type": "builtin", "json-type": "string"})
    );
    assert_eq!(entity(&schema, "SHUTDOWN")["meta-type"], "event");
}

#[test]
fn a_registered_command_replaces_the_builtins_schema_entry() {
    let mut h = Harness::negotiated();
    h.commands
        .register("query-status", Signature::new("x?:int", "{}"), |_, _| {
            Ok(json!({}))
        });
    let schema = schema_of(&h.lines(r#"{"execute": "query-qmp-schema"}"#));
    let entries: Vec<&Value> = schema
        .iter()
        .filter(|e| e["name"] == "query-status")
        .collect();
    assert_eq!(entries.len(), 1);
    let arg = entity(&schema, entries[0]["arg-type"].as_str().unwrap());
    assert_eq!(
        arg["members"],
        json!([{"name": "x", "default": null, "type": "int"}])
    );
}
