//! `key=value,...` option strings (QEMU: `util/keyval.c`, `keyval_parse`).
//!
//! `driver=raw,node-name=disk,file.driver=null-co,file.size=1048576`
//! becomes the nested object `{"driver": "raw", "node-name": "disk",
//! "file": {"driver": "null-co", "size": "1048576"}}`. Dotted keys nest,
//! numeric fragments make lists (`children.0.driver=…`), `,,` is a comma
//! inside a value, the first parameter may omit its key (the *implied key*,
//! `driver` for `--blockdev`), and a key given twice keeps its last value.
//! Every value stays a string: readers convert them as the schema says
//! ([`crate::options::Opts`] in keyval mode).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use serde_json::{Map, Value};

/// A malformed option string, with QEMU's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyvalError(pub String);

impl fmt::Display for KeyvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(msg: String) -> Result<T, KeyvalError> {
    Err(KeyvalError(msg))
}

/// QEMU's `parse_qapi_name` for a non-first-char-restricted fragment: a
/// letter then letters, digits, `-`, `_`; or (not first) an index.
fn fragment_ok(s: &str, first: bool) -> bool {
    if !first && !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
        return true;
    }
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Parses `params`; `implied_key` names the first parameter if it has no
/// `=` (QEMU: `keyval_parse(params, implied_key, NULL, errp)`).
pub fn keyval_parse(
    params: &str,
    implied_key: Option<&str>,
) -> Result<Map<String, Value>, KeyvalError> {
    let mut root = Map::new();
    let mut s = params;
    let mut implied = implied_key;
    while !s.is_empty() {
        let len = s.find(['=', ',']).unwrap_or(s.len());
        let (key, value, rest): (&str, String, &str);
        if len > 0
            && s.as_bytes().get(len) != Some(&b'=')
            && let Some(k) = implied
        {
            key = k;
            value = String::from(&s[..len]);
            rest = s.get(len + 1..).unwrap_or("");
        } else {
            key = &s[..len];
            if s.as_bytes().get(len) != Some(&b'=') {
                if key.is_empty()
                    || !key
                        .split('.')
                        .enumerate()
                        .all(|(i, f)| fragment_ok(f, i == 0))
                {
                    return err(format!("Invalid parameter '{key}'"));
                }
                return err(format!("Expected '=' after parameter '{key}'"));
            }
            let mut v = String::new();
            let mut rem = &s[len + 1..];
            loop {
                match rem.find(',') {
                    None => {
                        v.push_str(rem);
                        rem = "";
                        break;
                    }
                    Some(i) => {
                        v.push_str(&rem[..i]);
                        if rem[i + 1..].starts_with(',') {
                            v.push(',');
                            rem = &rem[i + 2..];
                        } else {
                            rem = &rem[i + 1..];
                            break;
                        }
                    }
                }
            }
            value = v;
            rest = rem;
        }
        implied = None;
        let frags: Vec<&str> = key.split('.').collect();
        if frags
            .iter()
            .enumerate()
            .any(|(i, f)| !fragment_ok(f, i == 0))
        {
            return err(format!("Invalid parameter '{key}'"));
        }
        put(&mut root, &frags, key, value)?;
        s = rest;
    }
    listify(Value::Object(root), "").and_then(|v| match v {
        Value::Object(m) => Ok(m),
        _ => err(String::from("Invalid parameter list")),
    })
}

fn put(
    cur: &mut Map<String, Value>,
    frags: &[&str],
    key: &str,
    value: String,
) -> Result<(), KeyvalError> {
    let Some((first, more)) = frags.split_first() else {
        return Ok(());
    };
    if more.is_empty() {
        if let Some(Value::Object(_)) = cur.get(*first) {
            return err(format!("Parameters '{key}.*' used inconsistently"));
        }
        cur.insert(String::from(*first), Value::String(value));
        return Ok(());
    }
    let entry = cur
        .entry(String::from(*first))
        .or_insert_with(|| Value::Object(Map::new()));
    match entry {
        Value::Object(m) => put(m, more, key, value),
        _ => {
            let prefix = key.len() - more.iter().map(|f| f.len() + 1).sum::<usize>();
            err(format!(
                "Parameters '{}.*' used inconsistently",
                &key[..prefix]
            ))
        }
    }
}

/// QEMU's `keyval_listify`: objects whose keys are all indexes become lists.
fn listify(v: Value, path: &str) -> Result<Value, KeyvalError> {
    let Value::Object(m) = v else { return Ok(v) };
    let mut out = Map::new();
    let mut indexes = 0;
    for (k, v) in m {
        let p = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        if k.chars().all(|c| c.is_ascii_digit()) {
            indexes += 1;
        }
        out.insert(k, listify(v, &p)?);
    }
    if indexes == 0 {
        return Ok(Value::Object(out));
    }
    if indexes != out.len() {
        return err(format!("Parameters '{path}.*' used inconsistently"));
    }
    let mut list = Vec::new();
    for i in 0..out.len() {
        match out.remove(&format!("{i}")) {
            Some(v) => list.push(v),
            None => return err(format!("Parameter '{path}.{i}' missing")),
        }
    }
    if !out.is_empty() {
        return err(format!("Parameter '{path}.{}' missing", list.len()));
    }
    Ok(Value::Array(list))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(s: &str) -> Result<Value, String> {
        keyval_parse(s, Some("driver"))
            .map(Value::Object)
            .map_err(|e| e.0)
    }

    #[test]
    fn nested_keys_lists_and_implied_key() {
        assert_eq!(
            p("raw,node-name=disk,file.driver=null-co,file.size=1048576").unwrap(),
            json!({"driver": "raw", "node-name": "disk", "file": {"driver": "null-co", "size": "1048576"}})
        );
        assert_eq!(
            p("driver=quorum,children.0=a,children.1.driver=null-co,vote-threshold=1").unwrap(),
            json!({"driver": "quorum", "children": ["a", {"driver": "null-co"}], "vote-threshold": "1"})
        );
        assert_eq!(
            p("null-co,node-name=a,,b").unwrap(),
            json!({"driver": "null-co", "node-name": "a,b"})
        );
        assert_eq!(p("null-co,size=1,size=2").unwrap()["size"], "2");
        assert_eq!(p("").unwrap(), json!({}));
    }

    #[test]
    fn errors_are_qemus() {
        assert_eq!(
            p("null-co,node-name").unwrap_err(),
            "Expected '=' after parameter 'node-name'"
        );
        assert_eq!(p("null-co,a..b=1").unwrap_err(), "Invalid parameter 'a..b'");
        assert_eq!(p("null-co,9a=1").unwrap_err(), "Invalid parameter '9a'");
        assert_eq!(
            p("null-co,file=x,file.driver=y").unwrap_err(),
            "Parameters 'file.*' used inconsistently"
        );
        assert_eq!(
            p("quorum,children.1=a").unwrap_err(),
            "Parameter 'children.0' missing"
        );
        assert_eq!(
            p("quorum,children.0=a,children.x=b").unwrap_err(),
            "Parameters 'children.*' used inconsistently"
        );
    }
}
