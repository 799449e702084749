//! The commands every QMP monitor has (`monitor/qmp-cmds-control.c` and
//! friends): `qmp_capabilities`, `query-version`, `query-commands`,
//! `query-status`, `quit`, and `query-qmp-schema` (`qapi/introspect.json`).
//!
//! They need the session's own state (negotiation, version, command
//! table), so the [`Session`](super::Session) runs them itself; the kernel
//! registers nothing for them. A command registered under one of these
//! names (except `qmp_capabilities`) replaces the built-in.
//!
//! Each validates its arguments like QEMU's generated marshallers (a
//! command without arguments still rejects unexpected ones).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use serde_json::{Map, Value, json};

use super::args::Args;
use super::dispatch::Dispatcher;
use super::error::QmpError;
use super::schema::{Introspector, Signature};

/// Names of the built-in commands, in their registration order.
pub const BUILTINS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-status",
    "quit",
    "query-qmp-schema",
];

/// The built-ins' signatures, by name (see [`schema`](super::schema)).
pub const BUILTIN_SIGNATURES: &[(&str, Signature)] = &[
    ("qmp_capabilities", Signature::new("enable?:[(oob)]", "{}")),
    (
        "query-version",
        Signature::new("", "{qemu:{major:int, minor:int, micro:int}, package:str}"),
    ),
    ("query-commands", Signature::new("", "[{name:str}]")),
    (
        "query-status",
        Signature::new(
            "",
            "{running:bool, singlestep:bool, status:(debug|inmigrate|internal-error|io-error|paused|postmigrate|prelaunch|finish-migrate|restore-vm|running|save-vm|shutdown|suspended|watchdog|guest-panicked|colo)}",
        ),
    ),
    ("quit", Signature::NONE),
    (
        "query-qmp-schema",
        Signature::new(
            "",
            "[{name:str, meta-type:(builtin|enum|array|object|alternate|command|event), features?:[str], ..}]",
        ),
    ),
];

/// The events every monitor may send: the run state's (QEMU's
/// `qapi/run-state.json`), emitted by the kernel's halt path.
pub const BUILTIN_EVENTS: &[(&str, &str)] = &[
    (
        "SHUTDOWN",
        "guest:bool, reason:(none|host-error|host-qmp-quit|host-qmp-system-reset|host-signal|host-ui|guest-shutdown|guest-reset|guest-panic|subsystem-reset|snapshot-load)",
    ),
    ("GUEST_PANICKED", "action:(pause|poweroff|run), info?:any"),
];

/// The capabilities QEMU 7.2 knows (`QMPCapability`).
const CAPABILITIES: &[&str] = &["oob"];

/// The built-in commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Builtin {
    Capabilities,
    QueryVersion,
    QueryCommands,
    QueryStatus,
    Quit,
    QuerySchema,
}

impl Builtin {
    pub(crate) fn lookup(name: &str) -> Option<Builtin> {
        Some(match name {
            "qmp_capabilities" => Builtin::Capabilities,
            "query-version" => Builtin::QueryVersion,
            "query-commands" => Builtin::QueryCommands,
            "query-status" => Builtin::QueryStatus,
            "quit" => Builtin::Quit,
            "query-qmp-schema" => Builtin::QuerySchema,
            _ => return None,
        })
    }
}

/// The version `query-version` and the greeting report (QEMU's
/// `VersionInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// `qemu.major`.
    pub major: u64,
    /// `qemu.minor`.
    pub minor: u64,
    /// `qemu.micro`.
    pub micro: u64,
    /// `package`: free text (QEMU's `QEMU_PKGVERSION`).
    pub package: String,
}

/// The default `package`: "blockhaus" and this crate's version.
pub const PACKAGE: &str = concat!("blockhaus ", env!("CARGO_PKG_VERSION"));

impl VersionInfo {
    /// The QEMU version to claim, with [`PACKAGE`] as `package`.
    pub fn new(major: u64, minor: u64, micro: u64) -> Self {
        VersionInfo {
            major,
            minor,
            micro,
            package: String::from(PACKAGE),
        }
    }

    /// `{"qemu": {"micro": M, "minor": m, "major": j}, "package": "..."}`.
    pub fn to_value(&self) -> Value {
        json!({
            "qemu": {"major": self.major, "minor": self.minor, "micro": self.micro},
            "package": self.package,
        })
    }
}

/// `qmp_capabilities`: validates `enable` and returns whether it enables
/// OOB. `offered_oob` is whether the greeting offered it.
pub(crate) fn qmp_capabilities(
    args: &Args<'_>,
    negotiated: bool,
    offered_oob: bool,
) -> Result<bool, QmpError> {
    let mut enable: Vec<&str> = Vec::new();
    for (i, cap) in args
        .opt_array("enable")?
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let cap = cap.as_str().ok_or_else(|| {
            QmpError::invalid_parameter_type(&args.element_name("enable", i), "string")
        })?;
        if !CAPABILITIES.contains(&cap) {
            // QEMU visits list elements without a name, printed "null".
            return Err(QmpError::generic(format!(
                "Parameter 'null' does not accept value '{cap}'"
            )));
        }
        enable.push(cap);
    }
    args.check_known(&["enable"])?;
    if negotiated {
        return Err(QmpError::command_not_found(
            "Capabilities negotiation is already complete, command ignored",
        ));
    }
    let unavailable: Vec<&str> = enable
        .iter()
        .copied()
        .filter(|&cap| !(cap == "oob" && offered_oob))
        .collect();
    if !unavailable.is_empty() {
        return Err(QmpError::generic(format!(
            "Capability {} not available",
            unavailable.join(", ")
        )));
    }
    Ok(enable.contains(&"oob"))
}

/// `query-version`.
pub(crate) fn query_version(args: &Args<'_>, version: &VersionInfo) -> Result<Value, QmpError> {
    args.check_known(&[])?;
    Ok(version.to_value())
}

/// `query-commands`: `[{"name": ...}, ...]`, newest registration first as
/// in QEMU (which prepends while walking its registration-ordered list).
pub(crate) fn query_commands<'n>(
    args: &Args<'_>,
    names: impl Iterator<Item = &'n str>,
) -> Result<Value, QmpError> {
    args.check_known(&[])?;
    let mut list: Vec<&str> = Vec::new();
    for name in BUILTINS.iter().copied().chain(names) {
        if !list.contains(&name) {
            list.push(name);
        }
    }
    Ok(Value::Array(
        list.iter()
            .rev()
            .map(|name| {
                let mut info = Map::new();
                info.insert("name".into(), Value::String((*name).into()));
                Value::Object(info)
            })
            .collect(),
    ))
}

/// `query-status`: blockhaus always runs (QEMU 7.2's `StatusInfo`).
pub(crate) fn query_status(args: &Args<'_>) -> Result<Value, QmpError> {
    args.check_known(&[])?;
    Ok(json!({"running": true, "singlestep": false, "status": "running"}))
}

/// `quit`: the reply is `{}`; the session then reports
/// [`Action::Quit`](super::Action::Quit).
pub(crate) fn quit(args: &Args<'_>) -> Result<Value, QmpError> {
    args.check_known(&[])?;
    Ok(Value::Object(Map::new()))
}

/// `query-qmp-schema`: every command (built-ins included, a registered
/// command replacing a built-in of its name), every event and the types
/// they use, as QEMU's `SchemaInfo` list.
pub(crate) fn query_qmp_schema<C>(args: &Args<'_>, d: &Dispatcher<C>) -> Result<Value, QmpError> {
    args.check_known(&[])?;
    schema(d).map(Value::Array)
}

/// The `SchemaInfo` list of `d` and the built-ins.
pub fn schema<C>(d: &Dispatcher<C>) -> Result<Vec<Value>, QmpError> {
    let mut out = Introspector::new(d.types());
    let bug = |e: super::schema::SpecError| QmpError::generic(format!("schema: {}", e.0));
    for (name, sig) in BUILTIN_SIGNATURES {
        if *name == "qmp_capabilities" || !d.contains(name) {
            out.command(name, sig).map_err(bug)?;
        }
    }
    for (name, sig) in d.signatures() {
        if name != "qmp_capabilities" {
            out.command(name, &sig).map_err(bug)?;
        }
    }
    for (name, data) in BUILTIN_EVENTS.iter().chain(d.events()) {
        out.event(name, data).map_err(bug)?;
    }
    Ok(out.finish())
}
