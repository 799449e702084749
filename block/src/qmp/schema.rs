//! Command signatures and `query-qmp-schema` (QEMU: the QAPI schema, its
//! generated marshallers' argument checks, and `qapi/introspect.json`).
//!
//! Every command is registered with a [`Signature`]: its arguments and its
//! return type, written in a compact QAPI-like notation. The same signature
//! serves twice, so there is one source of truth:
//!
//! - the [`Session`](super::Session) checks a call's top-level arguments
//!   against it before the handler runs, as QEMU's generated marshaller
//!   does (members in declaration order: presence, then JSON type and enum
//!   value; leftovers last), with the input visitor's texts;
//! - [`Introspector`] turns the whole table into `query-qmp-schema`'s
//!   `SchemaInfo` list.
//!
//! ## Notation
//!
//! A member list is `name:T, name?:T, ...` (`?` marks an optional member;
//! the empty string is "no arguments"). A trailing `..` marks an open list:
//! the members shown are checked, and further members are left to the
//! handler (a flat union such as `blockdev-add`'s `BlockdevOptions`,
//! whose variant members each driver reads itself). A type `T` is
//!
//! - a built-in: `str`, `int` (also `int64`, `uint32`, `uint64`, `size`:
//!   QEMU's introspection shows every integer type as `int`), `number`,
//!   `bool`, `null`, `any`;
//! - `[T]`, a list;
//! - `{members}`, an object;
//! - `(a|b|c)`, an enum; `(a|b|..)` one the context extends at run time
//!   (the values listed are shown, the handler checks the value);
//! - `@Name`, a named type from the [`Dispatcher`](super::Dispatcher)'s
//!   type table (see [`Dispatcher::register_type`](super::Dispatcher::register_type)).
//!
//! The return type is a type (`{}` for commands that return nothing);
//! [`Signature::new`] takes both.
//!
//! Non-built-in types get opaque numbered names in the schema, as in QEMU
//! (`"0"`, `"1"`, ...; `"[1]"` for a list of `"1"`).

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use serde_json::{Map, Value, json};

use super::args::Args;
use super::error::QmpError;

/// A command's (or an event's) arguments and return type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature {
    /// The argument member list.
    pub args: &'static str,
    /// The return type.
    pub ret: &'static str,
}

impl Signature {
    /// A signature with arguments `args` and return type `ret`.
    pub const fn new(args: &'static str, ret: &'static str) -> Signature {
        Signature { args, ret }
    }

    /// No arguments, returns `{}`.
    pub const NONE: Signature = Signature::new("", "{}");
}

/// A parsed type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ty {
    /// A built-in, by its QAPI name (`str`, `int`, `uint64`, ...).
    Builtin(&'static str),
    /// A list.
    List(alloc::boxed::Box<Ty>),
    /// An object.
    Object(Members),
    /// An enum.
    Enum(Vec<&'static str>),
    /// An enum whose values the context extends at run time (`(a|b|..)`,
    /// e.g. the block drivers): the schema shows the values listed, and the
    /// check leaves the value to the handler.
    OpenEnum(Vec<&'static str>),
    /// A named type.
    Named(&'static str),
}

/// One member of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its name.
    pub name: &'static str,
    /// Whether it may be absent.
    pub optional: bool,
    /// Its type.
    pub ty: Ty,
}

/// A member list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Members {
    /// The members, in order.
    pub members: Vec<Member>,
    /// Whether members not listed are accepted (and left to the handler).
    pub open: bool,
}

const BUILTINS: &[&str] = &[
    "str", "int", "int64", "uint32", "uint64", "size", "number", "bool", "null", "any",
];

/// A notation error: a bug in a signature, caught by the tests that
/// introspect every table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError(pub String);

struct Parser {
    s: &'static str,
    pos: usize,
}

impl Parser {
    fn skip_ws(&mut self) {
        while self.s[self.pos..].starts_with(' ') {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<char> {
        self.skip_ws();
        self.s[self.pos..].chars().next()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: char) -> Result<(), SpecError> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.error(&format!("expected '{c}'")))
        }
    }

    fn error(&self, what: &str) -> SpecError {
        SpecError(format!("{what} at {} in '{}'", self.pos, self.s))
    }

    fn word(&mut self) -> Result<&'static str, SpecError> {
        self.skip_ws();
        let rest = &self.s[self.pos..];
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .unwrap_or(rest.len());
        if len == 0 {
            return Err(self.error("expected a name"));
        }
        let s: &'static str = self.s;
        let w = &s[self.pos..self.pos + len];
        self.pos += len;
        Ok(w)
    }

    fn ty(&mut self) -> Result<Ty, SpecError> {
        match self.peek() {
            Some('[') => {
                self.pos += 1;
                let inner = self.ty()?;
                self.expect(']')?;
                Ok(Ty::List(alloc::boxed::Box::new(inner)))
            }
            Some('{') => {
                self.pos += 1;
                let m = self.members(Some('}'))?;
                self.expect('}')?;
                Ok(Ty::Object(m))
            }
            Some('(') => {
                self.pos += 1;
                let mut values = Vec::new();
                let mut open = false;
                loop {
                    if self.s[self.pos..].trim_start().starts_with("..") {
                        self.skip_ws();
                        self.pos += 2;
                        open = true;
                        break;
                    }
                    values.push(self.word()?);
                    if !self.eat('|') {
                        break;
                    }
                }
                self.expect(')')?;
                Ok(if open {
                    Ty::OpenEnum(values)
                } else {
                    Ty::Enum(values)
                })
            }
            Some('@') => {
                self.pos += 1;
                Ok(Ty::Named(self.word()?))
            }
            _ => {
                let w = self.word()?;
                if BUILTINS.contains(&w) {
                    Ok(Ty::Builtin(w))
                } else {
                    Err(self.error(&format!("unknown type '{w}'")))
                }
            }
        }
    }

    fn members(&mut self, end: Option<char>) -> Result<Members, SpecError> {
        let mut m = Members::default();
        if self.peek() == end {
            return Ok(m);
        }
        loop {
            if self.s[self.pos..].trim_start().starts_with("..") {
                self.skip_ws();
                self.pos += 2;
                m.open = true;
                break;
            }
            let name = self.word()?;
            let optional = self.eat('?');
            self.expect(':')?;
            let ty = self.ty()?;
            m.members.push(Member { name, optional, ty });
            if !self.eat(',') {
                break;
            }
        }
        Ok(m)
    }
}

/// Parses a member list.
pub fn parse_members(s: &'static str) -> Result<Members, SpecError> {
    let mut p = Parser { s, pos: 0 };
    let m = p.members(None)?;
    if p.peek().is_some() {
        return Err(p.error("trailing text"));
    }
    Ok(m)
}

/// Parses a type.
pub fn parse_type(s: &'static str) -> Result<Ty, SpecError> {
    let mut p = Parser { s, pos: 0 };
    let t = p.ty()?;
    if p.peek().is_some() {
        return Err(p.error("trailing text"));
    }
    Ok(t)
}

/// Checks the top-level members of a call's `arguments` against `args`
/// (a member list), as QEMU's generated marshaller does: each declared
/// member in order (missing, wrong type, bad enum value), then leftovers
/// unless the list is open. Nested objects are left to the handler.
pub fn check_args(spec: &'static str, args: &Args<'_>) -> Result<(), QmpError> {
    let members = parse_members(spec).map_err(|e| QmpError::generic(e.0))?;
    for m in &members.members {
        if !args.has(m.name) {
            if m.optional {
                continue;
            }
            return Err(QmpError::missing_parameter(&args.full_name(m.name)));
        }
        check_value(args, m.name, &m.ty)?;
    }
    if !members.open {
        let known: Vec<&str> = members.members.iter().map(|m| m.name).collect();
        args.check_known(&known)?;
    }
    Ok(())
}

fn check_value(args: &Args<'_>, name: &str, ty: &Ty) -> Result<(), QmpError> {
    match ty {
        Ty::Builtin("str") => args.str(name).map(drop),
        Ty::Builtin("int" | "int64") => args.i64(name).map(drop),
        Ty::Builtin("uint64" | "size") => args.u64(name).map(drop),
        Ty::Builtin("uint32") => args.u32(name).map(drop),
        Ty::Builtin("number") => args.number(name).map(drop),
        Ty::Builtin("bool") => args.bool(name).map(drop),
        Ty::Builtin("null") => match args.get(name) {
            Some(Value::Null) => Ok(()),
            _ => Err(QmpError::invalid_parameter_type(
                &args.full_name(name),
                "null",
            )),
        },
        Ty::Builtin(_) => Ok(()),
        Ty::Enum(values) => args.enum_str(name, values).map(drop),
        Ty::OpenEnum(_) => args.str(name).map(drop),
        Ty::Object(_) => args.obj(name).map(drop),
        Ty::List(elem) => {
            let list = args.array(name)?;
            let expected = match **elem {
                Ty::Builtin("str") | Ty::Enum(_) | Ty::OpenEnum(_) => {
                    Some(("string", Value::is_string as fn(&Value) -> bool))
                }
                Ty::Builtin("bool") => Some(("boolean", Value::is_boolean as fn(&Value) -> bool)),
                Ty::Object(_) => Some(("object", Value::is_object as fn(&Value) -> bool)),
                _ => None,
            };
            match expected.and_then(|(what, ok)| Some((what, list.iter().position(|v| !ok(v))?))) {
                Some((what, i)) => Err(QmpError::invalid_parameter_type(
                    &args.element_name(name, i),
                    what,
                )),
                None => Ok(()),
            }
        }
        Ty::Named(_) => Ok(()),
    }
}

/// The JSON type QEMU's introspection gives a built-in.
fn json_type(builtin: &str) -> &'static str {
    match builtin {
        "str" => "string",
        "number" => "number",
        "bool" => "boolean",
        "null" => "null",
        "any" => "value",
        _ => "int",
    }
}

/// The introspection name of a built-in (`uint64` and friends are `int`).
fn builtin_name(builtin: &str) -> &'static str {
    match builtin {
        "str" => "str",
        "number" => "number",
        "bool" => "bool",
        "null" => "null",
        "any" => "any",
        _ => "int",
    }
}

/// Builds the `SchemaInfo` list, naming every non-built-in type with a
/// number (the same structure gets the same name).
pub struct Introspector<'t> {
    named: &'t [(&'static str, &'static str)],
    /// Every entity, in order of first use.
    entities: Vec<Value>,
    /// Structural key → assigned name, for deduplication.
    names: Vec<(String, String)>,
    next: usize,
}

impl<'t> Introspector<'t> {
    /// An introspector resolving `@Name` types in `named`.
    pub fn new(named: &'t [(&'static str, &'static str)]) -> Self {
        Introspector {
            named,
            entities: Vec::new(),
            names: Vec::new(),
            next: 0,
        }
    }

    fn intern(&mut self, key: String, make: impl FnOnce(&str) -> Option<Value>) -> String {
        if let Some((_, n)) = self.names.iter().find(|(k, _)| *k == key) {
            return n.clone();
        }
        let name = if let Some(b) = key.strip_prefix("builtin:") {
            String::from(builtin_name(b))
        } else if let Some(elem) = key.strip_prefix("list:") {
            format!("[{elem}]")
        } else {
            let n = self.next.to_string();
            self.next += 1;
            n
        };
        self.names.push((key, name.clone()));
        if let Some(e) = make(&name) {
            self.entities.push(e);
        }
        name
    }

    /// The name of `ty`, adding its entity (and those it uses) on first use.
    pub fn type_name(&mut self, ty: &Ty) -> Result<String, SpecError> {
        Ok(match ty {
            Ty::Builtin(b) => {
                let b = builtin_name(b);
                self.intern(format!("builtin:{b}"), |name| {
                    Some(json!({"name": name, "meta-type": "builtin", "json-type": json_type(b)}))
                })
            }
            Ty::List(elem) => {
                let e = self.type_name(elem)?;
                self.intern(format!("list:{e}"), |name| {
                    Some(json!({"name": name, "meta-type": "array", "element-type": e}))
                })
            }
            Ty::Enum(values) | Ty::OpenEnum(values) => self.intern(format!("enum:{}", values.join("|")), |name| {
                let members: Vec<Value> = values.iter().map(|v| json!({"name": v})).collect();
                Some(json!({"name": name, "meta-type": "enum", "members": members, "values": values}))
            }),
            Ty::Object(m) => self.object(m)?,
            Ty::Named(n) => {
                let key = format!("named:{n}");
                if let Some((_, name)) = self.names.iter().find(|(k, _)| *k == key) {
                    return Ok(name.clone());
                }
                let spec = self
                    .named
                    .iter()
                    .find(|(k, _)| k == n)
                    .map(|(_, s)| *s)
                    .ok_or_else(|| SpecError(format!("unknown named type '@{n}'")))?;
                match parse_type(spec)? {
                    // Named first, members after: an object may contain
                    // itself (`BlockStats.parent`).
                    Ty::Object(m) => {
                        let name = self.next.to_string();
                        self.next += 1;
                        self.names.push((key, name.clone()));
                        let (members, _) = self.members(&m)?;
                        self.entities.push(
                            json!({"name": name, "meta-type": "object", "members": members}),
                        );
                        name
                    }
                    other => {
                        let name = self.type_name(&other)?;
                        self.names.push((key, name.clone()));
                        name
                    }
                }
            }
        })
    }

    /// The name of an object type with `m`.
    pub fn object(&mut self, m: &Members) -> Result<String, SpecError> {
        let (members, key) = self.members(m)?;
        Ok(self.intern(key, |name| {
            Some(json!({"name": name, "meta-type": "object", "members": members}))
        }))
    }

    /// The `members` of an object with `m`, and its structural key.
    fn members(&mut self, m: &Members) -> Result<(Vec<Value>, String), SpecError> {
        let mut members = Vec::new();
        let mut key = String::from("object:");
        for member in &m.members {
            let t = self.type_name(&member.ty)?;
            key.push_str(&format!(
                "{}{}:{t},",
                member.name,
                if member.optional { "?" } else { "" }
            ));
            let mut v = Map::new();
            v.insert("name".into(), json!(member.name));
            if member.optional {
                v.insert("default".into(), Value::Null);
            }
            v.insert("type".into(), json!(t));
            members.push(Value::Object(v));
        }
        if m.open {
            key.push_str("..");
        }
        Ok((members, key))
    }

    /// Adds a command.
    pub fn command(&mut self, name: &str, sig: &Signature) -> Result<(), SpecError> {
        let arg = self.object(&parse_members(sig.args)?)?;
        let ret = self.type_name(&parse_type(sig.ret)?)?;
        self.entities
            .push(json!({"name": name, "meta-type": "command", "arg-type": arg, "ret-type": ret}));
        Ok(())
    }

    /// Adds an event with data members `data`.
    pub fn event(&mut self, name: &str, data: &'static str) -> Result<(), SpecError> {
        let arg = self.object(&parse_members(data)?)?;
        self.entities
            .push(json!({"name": name, "meta-type": "event", "arg-type": arg}));
        Ok(())
    }

    /// The `SchemaInfo` list.
    pub fn finish(self) -> Vec<Value> {
        self.entities
    }
}
