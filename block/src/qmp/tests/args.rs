//! `Args`: QEMU's input-visitor texts.

use super::*;
use serde_json::Map;

fn map(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

fn err<T: core::fmt::Debug>(r: Result<T, QmpError>) -> String {
    let e = r.expect_err("expected an error");
    assert_eq!(e.class, ErrorClass::GenericError);
    e.desc
}

#[test]
fn mandatory_and_optional() {
    let m = map(json!({
        "node-name": "n0", "flag": true, "count": -3, "size": 1u64 << 40,
        "ratio": 0.5, "null": null, "obj": {"filename": "f", "x": 1}, "list": ["a", "b"],
    }));
    let a = Args::new(&m);
    assert_eq!(a.str("node-name"), Ok("n0"));
    assert_eq!(a.opt_str("node-name"), Ok(Some("n0")));
    assert_eq!(a.opt_str("absent"), Ok(None));
    assert_eq!(a.bool("flag"), Ok(true));
    assert_eq!(a.opt_bool("absent"), Ok(None));
    assert_eq!(a.i64("count"), Ok(-3));
    assert_eq!(a.opt_i64("size"), Ok(Some(1 << 40)));
    assert_eq!(a.u64("size"), Ok(1 << 40));
    assert_eq!(a.opt_u64("absent"), Ok(None));
    assert_eq!(a.number("ratio"), Ok(0.5));
    assert_eq!(a.number("count"), Ok(-3.0));
    assert_eq!(a.opt_number("absent"), Ok(None));
    assert_eq!(a.str_list("list"), Ok(alloc::vec!["a", "b"]));
    assert_eq!(
        a.opt_array("list").map(|l| l.map(<[Value]>::len)),
        Ok(Some(2))
    );
    assert_eq!(a.value("null"), Ok(&Value::Null));
    assert_eq!(a.opt_value("absent"), None);
    assert!(a.has("null") && !a.has("absent") && !a.is_empty());
    let obj = a.obj("obj").unwrap();
    assert_eq!(obj.str("filename"), Ok("f"));
    assert!(a.opt_obj("absent").unwrap().is_none());
    assert_eq!(
        a.check_known(&[
            "node-name",
            "flag",
            "count",
            "size",
            "ratio",
            "null",
            "obj",
            "list"
        ]),
        Ok(())
    );
}

#[test]
fn error_texts() {
    let m = map(json!({
        "s": "str", "i": 1, "f": 1.5, "b": false, "big": u64::MAX, "neg": -1,
        "null": null, "arr": [1], "o": {"inner": {"deep": 1}, "list": [{"k": 1}, 2]},
    }));
    let a = Args::new(&m);
    assert_eq!(err(a.str("node-name")), "Parameter 'node-name' is missing");
    assert_eq!(err(a.bool("absent")), "Parameter 'absent' is missing");
    assert_eq!(
        err(a.str("i")),
        "Invalid parameter type for 'i', expected: string"
    );
    assert_eq!(
        err(a.opt_str("null")),
        "Invalid parameter type for 'null', expected: string"
    );
    assert_eq!(
        err(a.bool("s")),
        "Invalid parameter type for 's', expected: boolean"
    );
    assert_eq!(
        err(a.i64("f")),
        "Invalid parameter type for 'f', expected: integer"
    );
    assert_eq!(
        err(a.i64("big")),
        "Invalid parameter type for 'big', expected: integer"
    );
    assert_eq!(
        err(a.opt_i64("s")),
        "Invalid parameter type for 's', expected: integer"
    );
    assert_eq!(
        err(a.number("s")),
        "Invalid parameter type for 's', expected: number"
    );
    assert_eq!(err(a.u64("s")), "Parameter 's' expects uint64");
    assert_eq!(err(a.u64("f")), "Parameter 'f' expects uint64");
    // QEMU accepts negative numbers for uint64 "for backward compatibility".
    assert_eq!(a.u64("neg"), Ok(u64::MAX));
    assert_eq!(a.u32("i"), Ok(1));
    assert_eq!(err(a.u32("big")), "Parameter 'big' expects uint32");
    assert_eq!(a.opt_u32("absent"), Ok(None));
    assert_eq!(
        err(a.obj("arr")),
        "Invalid parameter type for 'arr', expected: object"
    );
    assert_eq!(
        err(a.array("o")),
        "Invalid parameter type for 'o', expected: array"
    );
    assert_eq!(
        err(a.str_list("arr")),
        "Invalid parameter type for 'arr[0]', expected: string"
    );
    assert_eq!(a.enum_str("s", &["str", "other"]), Ok("str"));
    assert_eq!(
        err(a.enum_str("s", &["full", "top"])),
        "Parameter 's' does not accept value 'str'"
    );
    assert_eq!(
        err(a.opt_enum_str("i", &["full"])),
        "Invalid parameter type for 'i', expected: string"
    );
    assert_eq!(a.opt_enum_str("absent", &["full"]), Ok(None));
    // Nested names, as QEMU's full_name() builds them.
    let o = a.obj("o").unwrap();
    assert_eq!(o.full_name("x"), "o.x");
    assert_eq!(err(o.str("driver")), "Parameter 'o.driver' is missing");
    let inner = o.obj("inner").unwrap();
    assert_eq!(
        err(inner.str("deep")),
        "Invalid parameter type for 'o.inner.deep', expected: string"
    );
    assert_eq!(
        err(inner.check_known(&[])),
        "Parameter 'o.inner.deep' is unexpected"
    );
    assert_eq!(
        err(o.obj_list("list")),
        "Invalid parameter type for 'o.list[1]', expected: object"
    );
    let m2 = map(json!({"list": [{"k": 1}]}));
    let list = Args::new(&m2).obj_list("list").unwrap();
    assert_eq!(
        err(list[0].str("k")),
        "Invalid parameter type for 'list[0].k', expected: string"
    );
    assert_eq!(
        Args::new(&m2).opt_obj_list("absent").map(|l| l.is_none()),
        Ok(true)
    );
    // Leftovers.
    assert_eq!(
        err(Args::new(&map(json!({"a": 1}))).check_known(&["b"])),
        "Parameter 'a' is unexpected"
    );
    // With several, the first in QEMU's QDict order.
    assert_eq!(
        err(Args::new(&map(json!({"b": 1, "a": 2, "keep": 3}))).check_known(&["keep"])),
        "Parameter 'a' is unexpected"
    );
}
