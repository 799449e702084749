//! Command arguments with QEMU's input-visitor checks.
//!
//! QEMU's generated marshallers feed a command's `arguments` object through
//! the QObject input visitor (`qapi/qobject-input-visitor.c`), which checks
//! each member's presence and type, then rejects leftovers. [`Args`] does
//! the same one accessor at a time, with the same texts:
//!
//! | check | text |
//! |---|---|
//! | mandatory member absent | `Parameter 'NAME' is missing` |
//! | wrong JSON type | `Invalid parameter type for 'NAME', expected: TYPE` (`string`, `boolean`, `integer`, `number`, `object`, `array`, `null`) |
//! | not a `uint64` / `size` | `Parameter 'NAME' expects uint64` |
//! | out of range for `uint32` etc. | `Parameter 'NAME' expects uint32` |
//! | not an enum value | `Parameter 'NAME' does not accept value 'VALUE'` |
//! | member nobody asked for | `Parameter 'NAME' is unexpected` ([`Args::check_known`]) |
//!
//! `NAME` is the full name, as QEMU's `full_name()` builds it: `file.filename`
//! inside a nested object, `enable[0]` for a list element — except where
//! QEMU itself uses the bare member name (range and enum checks).
//!
//! QEMU visits every member first and checks leftovers last, so call
//! [`Args::check_known`] after the accessors to report the same error
//! first. An optional member whose value is `null` counts as present, and
//! is then the wrong type, as in QEMU.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use serde_json::{Map, Value};

use super::error::QmpError;
use super::json::qdict_cmp;

/// A command's `arguments` object (or a nested object in it).
#[derive(Debug, Clone)]
pub struct Args<'a> {
    map: &'a Map<String, Value>,
    /// Full name of this object; empty at the top.
    path: String,
}

type Res<T> = Result<T, QmpError>;

impl<'a> Args<'a> {
    /// Arguments over `map` (the top-level `arguments` object).
    pub fn new(map: &'a Map<String, Value>) -> Self {
        Args {
            map,
            path: String::new(),
        }
    }

    /// The underlying object.
    pub fn map(&self) -> &'a Map<String, Value> {
        self.map
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether member `name` is present (with any value, `null` included).
    pub fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// The raw value of member `name`, unchecked.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name)
    }

    /// The full name of member `name`, as it appears in error messages.
    pub fn full_name(&self, name: &str) -> String {
        if self.path.is_empty() {
            String::from(name)
        } else {
            format!("{}.{name}", self.path)
        }
    }

    /// The full name of element `index` of list member `name`.
    pub fn element_name(&self, name: &str, index: usize) -> String {
        format!("{}[{index}]", self.full_name(name))
    }

    /// Mandatory member of any type (QAPI `any`).
    pub fn value(&self, name: &str) -> Res<&'a Value> {
        self.map
            .get(name)
            .ok_or_else(|| QmpError::missing_parameter(&self.full_name(name)))
    }

    /// Optional member of any type.
    pub fn opt_value(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name)
    }

    /// Mandatory `str`.
    pub fn str(&self, name: &str) -> Res<&'a str> {
        self.typed(name, "string", Value::as_str)
    }

    /// Optional `str`.
    pub fn opt_str(&self, name: &str) -> Res<Option<&'a str>> {
        self.opt(name, |a| a.str(name))
    }

    /// Mandatory `bool`.
    pub fn bool(&self, name: &str) -> Res<bool> {
        self.typed(name, "boolean", Value::as_bool)
    }

    /// Optional `bool`.
    pub fn opt_bool(&self, name: &str) -> Res<Option<bool>> {
        self.opt(name, |a| a.bool(name))
    }

    /// Mandatory `int` (`int64`): any integer that fits `i64`.
    pub fn i64(&self, name: &str) -> Res<i64> {
        self.typed(name, "integer", Value::as_i64)
    }

    /// Optional `int`.
    pub fn opt_i64(&self, name: &str) -> Res<Option<i64>> {
        self.opt(name, |a| a.i64(name))
    }

    /// Mandatory `uint64` or `size`. Like QEMU, a negative `int64` is
    /// accepted "for backward compatibility" and wraps around.
    pub fn u64(&self, name: &str) -> Res<u64> {
        let value = self.value(name)?;
        value
            .as_u64()
            .or_else(|| value.as_i64().map(|i| i as u64))
            .ok_or_else(|| QmpError::invalid_parameter_value(&self.full_name(name), "uint64"))
    }

    /// Optional `uint64` or `size`.
    pub fn opt_u64(&self, name: &str) -> Res<Option<u64>> {
        self.opt(name, |a| a.u64(name))
    }

    /// Mandatory `uint32`.
    pub fn u32(&self, name: &str) -> Res<u32> {
        let value = self.u64(name)?;
        u32::try_from(value).map_err(|_| QmpError::invalid_parameter_value(name, "uint32"))
    }

    /// Optional `uint32`.
    pub fn opt_u32(&self, name: &str) -> Res<Option<u32>> {
        self.opt(name, |a| a.u32(name))
    }

    /// Mandatory `number` (any JSON number, as `f64`).
    pub fn number(&self, name: &str) -> Res<f64> {
        self.typed(name, "number", Value::as_f64)
    }

    /// Optional `number`.
    pub fn opt_number(&self, name: &str) -> Res<Option<f64>> {
        self.opt(name, |a| a.number(name))
    }

    /// Mandatory enum member: a string among `values`.
    pub fn enum_str(&self, name: &str, values: &[&str]) -> Res<&'a str> {
        let value = self.str(name)?;
        if values.contains(&value) {
            Ok(value)
        } else {
            Err(QmpError::generic(format!(
                "Parameter '{name}' does not accept value '{value}'"
            )))
        }
    }

    /// Optional enum member.
    pub fn opt_enum_str(&self, name: &str, values: &[&str]) -> Res<Option<&'a str>> {
        self.opt(name, |a| a.enum_str(name, values))
    }

    /// Mandatory nested object, as `Args` whose errors name `NAME.member`.
    pub fn obj(&self, name: &str) -> Res<Args<'a>> {
        let map = self.typed(name, "object", Value::as_object)?;
        Ok(Args {
            map,
            path: self.full_name(name),
        })
    }

    /// Optional nested object.
    pub fn opt_obj(&self, name: &str) -> Res<Option<Args<'a>>> {
        self.opt(name, |a| a.obj(name))
    }

    /// Mandatory list.
    pub fn array(&self, name: &str) -> Res<&'a [Value]> {
        self.typed(name, "array", |v| v.as_array().map(Vec::as_slice))
    }

    /// Optional list.
    pub fn opt_array(&self, name: &str) -> Res<Option<&'a [Value]>> {
        self.opt(name, |a| a.array(name))
    }

    /// Mandatory list of `str`; a bad element is `NAME[i]`.
    pub fn str_list(&self, name: &str) -> Res<Vec<&'a str>> {
        self.array(name)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().ok_or_else(|| {
                    QmpError::invalid_parameter_type(&self.element_name(name, i), "string")
                })
            })
            .collect()
    }

    /// Optional list of `str`.
    pub fn opt_str_list(&self, name: &str) -> Res<Option<Vec<&'a str>>> {
        self.opt(name, |a| a.str_list(name))
    }

    /// Mandatory list of objects; element `i` reports errors as `NAME[i].member`.
    pub fn obj_list(&self, name: &str) -> Res<Vec<Args<'a>>> {
        self.array(name)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let path = self.element_name(name, i);
                match v.as_object() {
                    Some(map) => Ok(Args { map, path }),
                    None => Err(QmpError::invalid_parameter_type(&path, "object")),
                }
            })
            .collect()
    }

    /// Optional list of objects.
    pub fn opt_obj_list(&self, name: &str) -> Res<Option<Vec<Args<'a>>>> {
        self.opt(name, |a| a.obj_list(name))
    }

    /// Rejects any member not in `known` (QEMU's `visit_check_struct`):
    /// "Parameter 'NAME' is unexpected".
    pub fn check_known(&self, known: &[&str]) -> Res<()> {
        let unexpected = self
            .map
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .min_by(|a, b| qdict_cmp(a, b));
        match unexpected {
            Some(key) => Err(QmpError::unexpected_parameter(&self.full_name(key))),
            None => Ok(()),
        }
    }

    fn typed<T>(&self, name: &str, expected: &str, get: impl Fn(&'a Value) -> Option<T>) -> Res<T> {
        get(self.value(name)?)
            .ok_or_else(|| QmpError::invalid_parameter_type(&self.full_name(name), expected))
    }

    fn opt<T>(&self, name: &str, get: impl Fn(&Self) -> Res<T>) -> Res<Option<T>> {
        if self.map.contains_key(name) {
            get(self).map(Some)
        } else {
            Ok(None)
        }
    }
}
