//! Reading nested block options (QEMU: `qobject-input-visitor.c`, as used
//! by `blockdev-add` and by qemu-storage-daemon's `--blockdev`).
//!
//! [`Opts`] reads one JSON object, remembers its path for error messages
//! (`file.driver`, `children[1].size`), remembers which members were read so
//! that [`Opts::check_unexpected`] can name the first left over in QEMU's
//! order, and produces QEMU's texts: "Parameter 'x' is missing", "Invalid
//! parameter type for 'x', expected: integer", "Parameter 'x' does not
//! accept value 'y'", "Parameter 'x' is unexpected".
//!
//! In *keyval* mode (QEMU: `qobject_input_visitor_new_keyval`), used for
//! `key=value,...` option strings, every scalar arrives as a string and is
//! converted on reading: booleans from `on`/`off`, integers with `0x`
//! prefixes, sizes with `k`/`M`/`G`/`T`/`P`/`E` suffixes.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;

use serde_json::{Map, Value};

use crate::qmp::QmpError;
use crate::qmp::json::qdict_cmp;

type Res<T> = Result<T, QmpError>;

/// One object of options being read.
pub struct Opts<'a> {
    map: &'a Map<String, Value>,
    path: String,
    keyval: bool,
    used: RefCell<Vec<String>>,
}

impl<'a> Opts<'a> {
    /// A reader of `map`; `keyval` for string-typed option strings.
    pub fn new(map: &'a Map<String, Value>, keyval: bool) -> Opts<'a> {
        Opts {
            map,
            path: String::new(),
            keyval,
            used: RefCell::new(Vec::new()),
        }
    }

    fn nested(&self, map: &'a Map<String, Value>, path: String) -> Opts<'a> {
        Opts {
            map,
            path,
            keyval: self.keyval,
            used: RefCell::new(Vec::new()),
        }
    }

    /// The object being read.
    pub fn map(&self) -> &'a Map<String, Value> {
        self.map
    }

    /// Whether this is keyval mode.
    pub fn is_keyval(&self) -> bool {
        self.keyval
    }

    /// `name` with this object's path in front (`file.driver`).
    pub fn full_name(&self, name: &str) -> String {
        if self.path.is_empty() {
            String::from(name)
        } else {
            format!("{}.{name}", self.path)
        }
    }

    fn element_name(&self, name: &str, i: usize) -> String {
        if self.keyval {
            format!("{}.{i}", self.full_name(name))
        } else {
            format!("{}[{i}]", self.full_name(name))
        }
    }

    /// The member `name`, marking it read.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        let v = self.map.get(name);
        if v.is_some() {
            let mut used = self.used.borrow_mut();
            if !used.iter().any(|u| u == name) {
                used.push(String::from(name));
            }
        }
        v
    }

    /// Whether the member exists (without marking it read).
    pub fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    fn missing(&self, name: &str) -> QmpError {
        QmpError::missing_parameter(&self.full_name(name))
    }

    fn bad_type(&self, name: &str, expected: &str) -> QmpError {
        QmpError::invalid_parameter_type(&self.full_name(name), expected)
    }

    /// A required string.
    pub fn str(&self, name: &str) -> Res<&'a str> {
        self.opt_str(name)?.ok_or_else(|| self.missing(name))
    }

    /// An optional string.
    pub fn opt_str(&self, name: &str) -> Res<Option<&'a str>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.bad_type(name, "string")),
        }
    }

    /// An optional boolean.
    pub fn opt_bool(&self, name: &str) -> Res<Option<bool>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if self.keyval => match s.as_str() {
                "on" | "yes" | "true" | "y" => Ok(Some(true)),
                "off" | "no" | "false" | "n" => Ok(Some(false)),
                _ => Err(QmpError::invalid_parameter_value(
                    &self.full_name(name),
                    "'on' or 'off'",
                )),
            },
            Some(_) => Err(self.bad_type(name, "boolean")),
        }
    }

    /// An optional boolean with a default.
    pub fn bool_or(&self, name: &str, default: bool) -> Res<bool> {
        Ok(self.opt_bool(name)?.unwrap_or(default))
    }

    /// An optional signed integer.
    pub fn opt_i64(&self, name: &str) -> Res<Option<i64>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.bad_type(name, "integer")),
            Some(Value::String(s)) if self.keyval => parse_int(s)
                .and_then(|v| i64::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| QmpError::invalid_parameter_value(&self.full_name(name), "integer")),
            Some(_) => Err(self.bad_type(name, "integer")),
        }
    }

    /// An optional unsigned integer.
    pub fn opt_u64(&self, name: &str) -> Res<Option<u64>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                (Some(v), _) => Ok(Some(v)),
                (None, Some(v)) => Ok(Some(v as u64)),
                _ => Err(self.bad_type(name, "integer")),
            },
            Some(Value::String(s)) if self.keyval => parse_int(s)
                .map(Some)
                .ok_or_else(|| QmpError::invalid_parameter_value(&self.full_name(name), "integer")),
            Some(_) => Err(self.bad_type(name, "integer")),
        }
    }

    /// An optional size (QAPI `size`: in keyval mode with suffixes).
    pub fn opt_size(&self, name: &str) -> Res<Option<u64>> {
        match self.get(name) {
            Some(Value::String(s)) if self.keyval => parse_size(s).map(Some).ok_or_else(|| {
                QmpError::invalid_parameter_value(&self.full_name(name), "a size value")
            }),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.bad_type(name, "integer")),
            None => Ok(None),
            Some(_) => Err(self.bad_type(name, "integer")),
        }
    }

    /// A required enum member out of `values`.
    pub fn enum_str(&self, name: &str, values: &[&str]) -> Res<&'a str> {
        self.opt_enum(name, values)?
            .ok_or_else(|| self.missing(name))
    }

    /// An optional enum member out of `values`.
    pub fn opt_enum(&self, name: &str, values: &[&str]) -> Res<Option<&'a str>> {
        match self.opt_str(name)? {
            None => Ok(None),
            Some(v) if values.contains(&v) => Ok(Some(v)),
            Some(v) => Err(QmpError::generic(format!(
                "Parameter '{}' does not accept value '{v}'",
                self.full_name(name)
            ))),
        }
    }

    /// An optional nested object.
    pub fn opt_obj(&self, name: &str) -> Res<Option<Opts<'a>>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(self.nested(m, self.full_name(name)))),
            Some(_) => Err(self.bad_type(name, "object")),
        }
    }

    /// An optional list, as (path of each element, element).
    pub fn opt_list(&self, name: &str) -> Res<Option<Vec<(String, &'a Value)>>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(
                a.iter()
                    .enumerate()
                    .map(|(i, v)| (self.element_name(name, i), v))
                    .collect(),
            )),
            Some(_) => Err(self.bad_type(name, "array")),
        }
    }

    /// A reader for an object found at `path` (a list element).
    pub fn element(&self, path: String, map: &'a Map<String, Value>) -> Opts<'a> {
        Opts {
            map,
            path,
            keyval: self.keyval,
            used: RefCell::new(Vec::new()),
        }
    }

    /// An optional list of enum strings.
    pub fn opt_enum_list(&self, name: &str, values: &[&str]) -> Res<Option<Vec<&'a str>>> {
        let Some(items) = self.opt_list(name)? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        for (path, v) in items {
            match v {
                Value::String(s) if values.contains(&s.as_str()) => out.push(s.as_str()),
                Value::String(s) => {
                    return Err(QmpError::generic(format!(
                        "Parameter '{path}' does not accept value '{s}'"
                    )));
                }
                _ => return Err(QmpError::invalid_parameter_type(&path, "string")),
            }
        }
        Ok(Some(out))
    }

    /// Fails on the first member (in QEMU's order) nobody read.
    pub fn check_unexpected(&self) -> Res<()> {
        let used = self.used.borrow();
        let first = self
            .map
            .keys()
            .filter(|k| !used.iter().any(|u| u == *k))
            .min_by(|a, b| qdict_cmp(a, b));
        match first {
            Some(k) => Err(QmpError::unexpected_parameter(&self.full_name(k))),
            None => Ok(()),
        }
    }
}

/// QEMU's `parse_uint_full(s, 0, …)`: decimal, `0x` hex or `0` octal.
pub fn parse_int(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).ok();
    }
    if s.len() > 1
        && let Some(o) = s.strip_prefix('0')
    {
        return u64::from_str_radix(o, 8).ok();
    }
    s.parse().ok()
}

/// QEMU's `qemu_strtosz`: a number (decimal fraction allowed with a
/// suffix) with an optional `B`/`K`/`M`/`G`/`T`/`P`/`E` suffix.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'x' || c == 'X'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let mult: u64 = match suffix {
        "" | "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" => 1 << 60,
        _ => return None,
    };
    if let Some((int, frac)) = num.split_once('.') {
        if mult == 1 || int.is_empty() || frac.is_empty() {
            return None;
        }
        let int: u64 = int.parse().ok()?;
        if frac.len() > 18 || !frac.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let num: u128 = frac.parse().ok()?;
        let den: u128 = 10u128.pow(frac.len() as u32);
        let part = u64::try_from(num * u128::from(mult) / den).ok()?;
        let v = int.checked_mul(mult)?.checked_add(part)?;
        return Some(v);
    }
    let n = if num.starts_with("0x") || num.starts_with("0X") {
        if mult != 1 {
            return None;
        }
        parse_int(num)?
    } else {
        num.parse::<u64>().ok()?
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn texts_and_paths() {
        let m = obj(json!({"driver": "raw", "file": {"size": "x", "extra": 1}, "n": 1.5}));
        let o = Opts::new(&m, false);
        assert_eq!(o.str("driver").unwrap(), "raw");
        let f = o.opt_obj("file").unwrap().unwrap();
        assert_eq!(
            f.str("driver").unwrap_err().desc,
            "Parameter 'file.driver' is missing"
        );
        assert_eq!(
            f.opt_u64("size").unwrap_err().desc,
            "Invalid parameter type for 'file.size', expected: integer"
        );
        assert_eq!(
            f.check_unexpected().unwrap_err().desc,
            "Parameter 'file.extra' is unexpected"
        );
        assert_eq!(
            o.opt_i64("n").unwrap_err().desc,
            "Invalid parameter type for 'n', expected: integer"
        );
        assert_eq!(
            o.opt_enum("driver", &["null-co"]).unwrap_err().desc,
            "Parameter 'driver' does not accept value 'raw'"
        );
        assert!(o.check_unexpected().is_ok());
    }

    #[test]
    fn keyval_conversions() {
        let m = obj(
            json!({"ro": "on", "bad": "maybe", "size": "64M", "half": "1.5k", "hex": "0x10", "n": "12"}),
        );
        let o = Opts::new(&m, true);
        assert_eq!(o.opt_bool("ro").unwrap(), Some(true));
        assert_eq!(
            o.opt_bool("bad").unwrap_err().desc,
            "Parameter 'bad' expects 'on' or 'off'"
        );
        assert_eq!(o.opt_size("size").unwrap(), Some(64 << 20));
        assert_eq!(o.opt_size("half").unwrap(), Some(1536));
        assert_eq!(o.opt_u64("hex").unwrap(), Some(16));
        assert_eq!(o.opt_i64("n").unwrap(), Some(12));
        assert_eq!(
            o.opt_u64("ro").unwrap_err().desc,
            "Parameter 'ro' expects integer"
        );
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("12x"), None);
        assert_eq!(parse_size("4096"), Some(4096));
    }
}
