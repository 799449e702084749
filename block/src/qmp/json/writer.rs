//! The JSON writer: QEMU's `qobject/json-writer.c` (`qobject_to_json`).
//!
//! Byte-for-byte QEMU's compact format: `", "` between members and
//! elements, `": "` after keys; strings escape `"`, `\`, `\b \f \n \r \t`,
//! and every other character outside `0x20..0x7F` as `\uXXXX` (upper-case
//! hex, surrogate pairs beyond the BMP); integers as such, floats as C's
//! `%.17g`.
//!
//! Object members come out in the order QEMU's `QDict` iterates them: by
//! hash bucket (`tdb_hash(key) % 512`). That is why QEMU prints
//! `{"timestamp": ..., "event": ..., "data": ...}` and `{"return": ...,
//! "id": ...}`. Within one bucket QEMU prints the newest insertion first;
//! serde_json's map does not remember insertion order, so ties fall back to
//! a small table of known QEMU orders ([`TIES`]), then to key order.
//!
//! The writer keeps its own stack, so deep values cannot exhaust the
//! machine stack.

use alloc::string::String;
use alloc::vec::Vec;
use core::cmp::Ordering;
use core::fmt::Write as _;
use serde_json::{Map, Number, Value};

/// Known same-bucket pairs, (printed first, printed second), as QEMU
/// prints them (`StatusInfo` is built `running`, `singlestep`, `status`).
pub const TIES: &[(&str, &str)] = &[("status", "singlestep")];

/// QEMU's `tdb_hash()` (`qobject/qdict.c`).
fn tdb_hash(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(b) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
}

/// The `QDict` bucket of `key` (`QDICT_BUCKET_MAX` is 512).
fn bucket(key: &str) -> u32 {
    tdb_hash(key) % 512
}

/// Compares two keys by QEMU's `QDict` iteration order.
pub fn qdict_cmp(a: &str, b: &str) -> Ordering {
    bucket(a).cmp(&bucket(b)).then_with(|| {
        if TIES.contains(&(a, b)) {
            Ordering::Less
        } else if TIES.contains(&(b, a)) {
            Ordering::Greater
        } else {
            a.cmp(b)
        }
    })
}

/// The members of `map` in QEMU's `QDict` iteration order.
pub fn qdict_order(map: &Map<String, Value>) -> Vec<(&str, &Value)> {
    let mut members: Vec<(&str, &Value)> = map.iter().map(|(k, v)| (k.as_str(), v)).collect();
    members.sort_by(|a, b| qdict_cmp(a.0, b.0));
    members
}

/// Appends `value` to `out` as QEMU would print it.
pub fn write_value(out: &mut Vec<u8>, value: &Value) {
    enum Open<'a> {
        Array(core::slice::Iter<'a, Value>),
        Object(alloc::vec::IntoIter<(&'a str, &'a Value)>),
    }
    let mut stack: Vec<Open<'_>> = Vec::new();
    let mut next = Some(value);
    loop {
        if let Some(value) = next.take() {
            let opened = match value {
                Value::Array(items) if !items.is_empty() => {
                    out.push(b'[');
                    stack.push(Open::Array(items.iter()));
                    true
                }
                Value::Object(map) if !map.is_empty() => {
                    out.push(b'{');
                    stack.push(Open::Object(qdict_order(map).into_iter()));
                    true
                }
                Value::Array(_) => {
                    out.extend_from_slice(b"[]");
                    false
                }
                Value::Object(_) => {
                    out.extend_from_slice(b"{}");
                    false
                }
                Value::Null => {
                    out.extend_from_slice(b"null");
                    false
                }
                Value::Bool(b) => {
                    out.extend_from_slice(if *b { b"true" } else { b"false" });
                    false
                }
                Value::Number(n) => {
                    write_number(out, n);
                    false
                }
                Value::String(s) => {
                    write_str(out, s);
                    false
                }
            };
            if opened {
                // The first member of a non-empty container: no comma.
                match stack.last_mut() {
                    Some(Open::Array(iter)) => next = iter.next(),
                    Some(Open::Object(iter)) => {
                        if let Some((k, v)) = iter.next() {
                            write_str(out, k);
                            out.extend_from_slice(b": ");
                            next = Some(v);
                        }
                    }
                    None => {}
                }
                continue;
            }
        }
        // Continue the innermost open container after a finished value.
        match stack.last_mut() {
            None => return,
            Some(Open::Array(iter)) => match iter.next() {
                Some(v) => {
                    out.extend_from_slice(b", ");
                    next = Some(v);
                }
                None => {
                    out.push(b']');
                    stack.pop();
                }
            },
            Some(Open::Object(iter)) => match iter.next() {
                Some((k, v)) => {
                    out.extend_from_slice(b", ");
                    write_str(out, k);
                    out.extend_from_slice(b": ");
                    next = Some(v);
                }
                None => {
                    out.push(b'}');
                    stack.pop();
                }
            },
        }
    }
}

/// `value` as QEMU would print it.
pub fn to_string(value: &Value) -> String {
    let mut out = Vec::new();
    write_value(&mut out, value);
    // The writer only emits ASCII.
    String::from_utf8(out).unwrap_or_default()
}

/// Appends `s` as a JSON string, escaped as QEMU's `quoted_str()` does.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            ' '..='~' => out.push(c as u8),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    push_fmt(out, format_args!("\\u{:04X}", unit));
                }
            }
        }
    }
    out.push(b'"');
}

fn write_number(out: &mut Vec<u8>, n: &Number) {
    if let Some(u) = n.as_u64() {
        push_fmt(out, format_args!("{u}"));
    } else if let Some(i) = n.as_i64() {
        push_fmt(out, format_args!("{i}"));
    } else if let Some(f) = n.as_f64() {
        out.extend_from_slice(format_g17(f).as_bytes());
    }
}

fn push_fmt(out: &mut Vec<u8>, args: core::fmt::Arguments<'_>) {
    let mut s = String::new();
    let _ = s.write_fmt(args);
    out.extend_from_slice(s.as_bytes());
}

/// C's `printf("%.17g", x)`, which QEMU uses for floating-point numbers.
pub fn format_g17(x: f64) -> String {
    const P: i32 = 17;
    if x.is_nan() {
        return String::from(if x.is_sign_negative() { "-nan" } else { "nan" });
    }
    if x.is_infinite() {
        return String::from(if x < 0.0 { "-inf" } else { "inf" });
    }
    if x == 0.0 {
        return String::from(if x.is_sign_negative() { "-0" } else { "0" });
    }
    // 17 significant digits, correctly rounded, as d.dddddddddddddddde±X
    let mut sci = String::new();
    let _ = write!(sci, "{:.16e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let mut out = String::new();
    if x < 0.0 {
        out.push('-');
    }
    if !(-4..P).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        out.push_str(first);
        let rest = rest.trim_end_matches('0');
        if !rest.is_empty() {
            out.push('.');
            out.push_str(rest);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    } else if exp >= 0 {
        let (int, frac) = digits.split_at(exp as usize + 1);
        out.push_str(int);
        let frac = frac.trim_end_matches('0');
        if !frac.is_empty() {
            out.push('.');
            out.push_str(frac);
        }
    } else {
        out.push_str("0.");
        for _ in 0..(-exp - 1) {
            out.push('0');
        }
        out.push_str(digits.trim_end_matches('0'));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn qemu_member_order() {
        let greeting = json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
            "package": "v7.2.0"}, "capabilities": ["oob"]}});
        assert_eq!(
            to_string(&greeting),
            r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "v7.2.0"}, "capabilities": ["oob"]}}"#
        );
        let event =
            json!({"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}});
        assert_eq!(
            to_string(&event),
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP", "data": {}}"#
        );
        let status = json!({"running": true, "singlestep": false, "status": "running"});
        assert_eq!(
            to_string(&status),
            r#"{"status": "running", "singlestep": false, "running": true}"#
        );
        assert_eq!(
            to_string(&json!({"id": 1, "error": {"desc": "d", "class": "GenericError"}})),
            r#"{"id": 1, "error": {"class": "GenericError", "desc": "d"}}"#
        );
    }

    #[test]
    fn scalars_and_escapes() {
        assert_eq!(to_string(&json!([])), "[]");
        assert_eq!(to_string(&json!({})), "{}");
        assert_eq!(to_string(&json!([[], {}, [1, [2]]])), "[[], {}, [1, [2]]]");
        assert_eq!(
            to_string(&json!([null, true, -5, u64::MAX])),
            "[null, true, -5, 18446744073709551615]"
        );
        assert_eq!(
            to_string(&json!("q\"b\\\u{8}\u{c}\n\r\t\u{1}\u{7f}é😀/")),
            r#""q\"b\\\b\f\n\r\t\u0001\u007F\u00E9\uD83D\uDE00/""#
        );
        assert_eq!(to_string(&json!("\0")), r#""\u0000""#);
    }

    #[test]
    fn floats_like_printf() {
        assert_eq!(format_g17(1.5), "1.5");
        assert_eq!(format_g17(0.1), "0.10000000000000001");
        assert_eq!(format_g17(100.0), "100");
        assert_eq!(format_g17(-0.0), "-0");
        assert_eq!(format_g17(1e300), "1.0000000000000001e+300");
        assert_eq!(format_g17(1e16), "10000000000000000");
        assert_eq!(format_g17(1e17), "1e+17");
        assert_eq!(format_g17(0.0001), "0.0001");
        assert_eq!(format_g17(0.00001), "1.0000000000000001e-05");
        assert_eq!(format_g17(-2.5e-7), "-2.4999999999999999e-07");
    }

    #[test]
    fn deep_values_do_not_recurse() {
        let mut v = json!(1);
        for _ in 0..100_000 {
            v = Value::Array(alloc::vec![v]);
        }
        let s = to_string(&v);
        assert_eq!(s.len(), 200_001);
        crate::qmp::json::parser::drop_value(v);
    }
}
