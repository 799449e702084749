//! The NBD QMP commands and boot options, in qemu-storage-daemon's shapes
//! and with QEMU's error texts (QEMU: `blockdev-nbd.c`,
//! `block/export/export.c`): `nbd-server-start`/`-stop`,
//! `block-export-add`/`-del`, `query-block-exports`, the legacy
//! `nbd-server-add`/`-remove`, and `--nbd-server`/`--export`.
//!
//! Arguments are read from a JSON object either as QMP sends them (typed)
//! or as `keyval` option strings give them (every value a string), so the
//! command and the boot option share one parser. Listening is the
//! platform's part: it supplies an [`NbdServer`] through [`NbdContext`].

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefMut;
use core::net::Ipv4Addr;
use serde_json::{Map, Value, json};

use super::bitmaps::BitmapRef;
use super::table::{ExportTable, NewExport};
use crate::qmp::{Args, Dispatcher, QmpError, Signature};
use crate::tls_creds::{self, TlsCredsX509};

/// Where `nbd-server-start` listens.
pub struct ServerConfig {
    /// `None`: every address.
    pub host: Option<Ipv4Addr>,
    pub port: u16,
    /// 0: unlimited. [`DEFAULT_MAX_CONNECTIONS`] when not given.
    pub max_connections: u32,
    /// A client still negotiating this long after it connected is
    /// dropped (QEMU 10: `handshake-max-seconds`); 0: no limit.
    /// [`DEFAULT_HANDSHAKE_MAX_SECONDS`] when not given.
    pub handshake_max_seconds: u32,
    /// `tls-creds`: the `tls-creds-x509` object named; clients must then
    /// start TLS before anything else.
    pub tls: Option<Rc<TlsCredsX509>>,
    /// `tls-authz`: the identity of the `authz-simple` object named, the
    /// one client distinguished name admitted.
    pub tls_authz: Option<String>,
}

/// `max-connections` when not given: QEMU's default since the
/// CVE-2024-7409 fix (`NBD_DEFAULT_MAX_CONNECTIONS`).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 100;

/// `handshake-max-seconds` when not given (QEMU:
/// `NBD_DEFAULT_HANDSHAKE_MAX_SECS`).
pub const DEFAULT_HANDSHAKE_MAX_SECONDS: u32 = 10;

/// The platform's NBD server (QEMU: `NBDServerData`): the listening
/// sockets, and the export table its clients reach.
pub trait NbdServer {
    /// Starts listening (`NBD server already running` if it does).
    fn start(&mut self, cfg: ServerConfig) -> Result<(), String>;
    /// Stops listening and asks every export to go (QEMU:
    /// `blk_exp_close_all_type(NBD)`); `NBD server not running` if it
    /// does not run.
    fn stop(&mut self) -> Result<(), String>;
    /// Whether the server listens.
    fn running(&self) -> bool;
    /// The export table, once there is one.
    fn exports(&self) -> Option<Rc<ExportTable>>;
}

/// A QMP context that holds an NBD server, as
/// [`BlockContext`](crate::layer::BlockContext) holds the block layer.
pub trait NbdContext {
    /// The NBD server.
    fn nbd_server(&self) -> RefMut<'_, dyn NbdServer>;
}

type Res = Result<Value, QmpError>;

/// One object of arguments, typed (QMP) or all strings (keyval).
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    fn new(map: &'a Map<String, Value>) -> Obj<'a> {
        Obj {
            map,
            path: String::new(),
        }
    }

    fn name(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.into()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn check_known(&self, known: &[&str]) -> Result<(), QmpError> {
        match self.map.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(QmpError::unexpected_parameter(&self.name(k))),
            None => Ok(()),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>, QmpError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(QmpError::invalid_parameter_type(&self.name(key), "string")),
        }
    }

    fn str(&self, key: &str) -> Result<&'a str, QmpError> {
        self.opt_str(key)?
            .ok_or_else(|| QmpError::missing_parameter(&self.name(key)))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, QmpError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) => match s.as_str() {
                "on" | "yes" | "true" | "y" => Ok(Some(true)),
                "off" | "no" | "false" | "n" => Ok(Some(false)),
                _ => Err(QmpError::invalid_parameter_value(
                    &self.name(key),
                    "'on' or 'off'",
                )),
            },
            Some(_) => Err(QmpError::invalid_parameter_type(&self.name(key), "boolean")),
        }
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>, QmpError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| QmpError::invalid_parameter_value(&self.name(key), "uint64")),
            Some(Value::String(s)) => s.parse().map(Some).map_err(|_| {
                QmpError::invalid_parameter_value(&self.name(key), "a non-negative number")
            }),
            Some(_) => Err(QmpError::invalid_parameter_type(&self.name(key), "integer")),
        }
    }

    /// A list of unsigned integers (the command line's `key.0=…` arrives
    /// as a list too: keyval listifies indexed keys).
    fn opt_u64_list(&self, key: &str) -> Result<Option<Vec<u64>>, QmpError> {
        let items = match self.map.get(key) {
            None => return Ok(None),
            Some(Value::Array(a)) => a,
            Some(_) => return Err(QmpError::invalid_parameter_type(&self.name(key), "array")),
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let name = format!("{}[{i}]", self.name(key));
            let n = match item {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.parse().ok(),
                _ => None,
            };
            out.push(n.ok_or_else(|| QmpError::invalid_parameter_type(&name, "uint64"))?);
        }
        Ok(Some(out))
    }

    /// `bitmaps`: names, or `{node, name}` objects (QEMU:
    /// `['BlockDirtyBitmapOrStr']`).
    fn bitmaps(&self, key: &str) -> Result<Vec<BitmapRef>, QmpError> {
        let list = match self.map.get(key) {
            None => return Ok(Vec::new()),
            Some(Value::Array(a)) => a,
            Some(_) => return Err(QmpError::invalid_parameter_type(&self.name(key), "array")),
        };
        let mut out = Vec::new();
        for (i, v) in list.iter().enumerate() {
            let path = format!("{}[{i}]", self.name(key));
            match v {
                Value::String(s) => out.push(BitmapRef::Local(s.clone())),
                Value::Object(m) => {
                    let o = Obj {
                        map: m,
                        path: path.clone(),
                    };
                    o.check_known(&["node", "name"])?;
                    out.push(BitmapRef::External {
                        node: o.str("node")?.into(),
                        name: o.str("name")?.into(),
                    });
                }
                _ => {
                    return Err(QmpError::invalid_parameter_type(
                        &path,
                        "BlockDirtyBitmapOrStr",
                    ));
                }
            }
        }
        Ok(out)
    }

    fn opt_obj(&self, key: &str) -> Result<Option<Obj<'a>>, QmpError> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Obj {
                map: m,
                path: self.name(key),
            })),
            Some(_) => Err(QmpError::invalid_parameter_type(&self.name(key), "object")),
        }
    }
}

/// `addr`: a flat `SocketAddress` (`{type, host, port}`, qemu-storage-daemon
/// and keyval) or a legacy one (`{type, data: {host, port}}`, QMP).
fn parse_addr(addr: &Obj<'_>) -> Result<(Option<Ipv4Addr>, u16), QmpError> {
    let kind = addr.str("type")?;
    if kind != "inet" {
        return Err(QmpError::generic(format!(
            "blockhaus serves NBD over TCP only ('inet'), not '{kind}'"
        )));
    }
    let data = match addr.opt_obj("data")? {
        Some(d) => {
            addr.check_known(&["type", "data"])?;
            d
        }
        None => Obj {
            map: addr.map,
            path: addr.path.clone(),
        },
    };
    data.check_known(&[
        "type",
        "host",
        "port",
        "numeric",
        "to",
        "ipv4",
        "ipv6",
        "keep-alive",
    ])?;
    let host = data.str("host")?;
    let port_text = match data.map.get("port") {
        Some(Value::Number(n)) => format!("{n}"),
        _ => String::from(data.str("port")?),
    };
    let port: u16 = port_text
        .parse()
        .map_err(|_| QmpError::generic(format!("Port '{port_text}' is not a number")))?;
    let host = match host {
        "" | "0.0.0.0" | "::" | "[::]" | "localhost" => None,
        h => Some(h.parse().map_err(|_| {
            QmpError::generic(format!(
                "address resolution failed for {h}:{port}: Name or service not known"
            ))
        })?),
    };
    Ok((host, port))
}

fn server_start(server: &mut dyn NbdServer, args: &Obj<'_>) -> Result<(), QmpError> {
    args.check_known(&[
        "addr",
        "tls-creds",
        "tls-authz",
        "max-connections",
        "handshake-max-seconds",
    ])?;
    let Some(addr) = args.opt_obj("addr")? else {
        return Err(QmpError::missing_parameter("addr"));
    };
    let (host, port) = parse_addr(&addr)?;
    let tls = match args.opt_str("tls-creds")? {
        None => None,
        Some(id) => {
            let Some(exports) = server.exports() else {
                return Err(QmpError::generic(format!(
                    "No TLS credentials with id '{id}'"
                )));
            };
            Some(tls_creds::resolve(exports.registry(), id)?)
        }
    };
    let tls_authz = match args.opt_str("tls-authz")? {
        None => None,
        // QEMU does not check this; without TLS the identity would never
        // be asked for.
        Some(_) if tls.is_none() => {
            return Err(QmpError::generic("'tls-authz' needs 'tls-creds'"));
        }
        Some(id) => match server.exports() {
            Some(exports) => Some(tls_creds::resolve_authz(exports.registry(), id)?),
            None => {
                return Err(QmpError::generic(format!(
                    "Cannot find QAuthZ object ID {id}"
                )));
            }
        },
    };
    let uint32 = |name: &str, default: u32| -> Result<u32, QmpError> {
        match args.opt_u64(name)? {
            None => Ok(default),
            Some(v) => {
                u32::try_from(v).map_err(|_| QmpError::invalid_parameter_value(name, "uint32"))
            }
        }
    };
    let max_connections = uint32("max-connections", DEFAULT_MAX_CONNECTIONS)?;
    let handshake_max_seconds = uint32("handshake-max-seconds", DEFAULT_HANDSHAKE_MAX_SECONDS)?;
    server
        .start(ServerConfig {
            host,
            port,
            max_connections,
            handshake_max_seconds,
            tls,
            tls_authz,
        })
        .map_err(QmpError::generic)?;
    // QEMU (nbd_export_create): multi-conn only where a client may open
    // more than one connection.
    if let Some(table) = server.exports() {
        table.set_multi_conn(max_connections != 1);
    }
    Ok(())
}

fn export_add<C: NbdContext>(app: &C, args: &Obj<'_>) -> Result<(), QmpError> {
    args.check_known(&[
        "type",
        "id",
        "node-name",
        "writable",
        "writethrough",
        "iothread",
        "fixed-iothread",
        "name",
        "description",
        "bitmaps",
        "allocation-depth",
        "x-stats-intervals",
    ])?;
    let kind = args.str("type")?;
    if kind != "nbd" {
        return Err(QmpError::generic(
            "No driver found for the requested export type",
        ));
    }
    let id = args.str("id")?;
    let node_name = args.str("node-name")?;
    let writable = args.opt_bool("writable")?.unwrap_or(false);
    let _ = args.opt_bool("writethrough")?;
    if args.map.contains_key("iothread") {
        return Err(QmpError::generic(format!(
            "iothread \"{}\" not found",
            args.opt_str("iothread")?.unwrap_or("")
        )));
    }
    let bitmaps = args.bitmaps("bitmaps")?;
    let allocation_depth = args.opt_bool("allocation-depth")?.unwrap_or(false);
    let intervals = args.opt_u64_list("x-stats-intervals")?.unwrap_or_default();
    if let Some(bad) = intervals.iter().find(|&&i| i == 0 || i > u32::MAX.into()) {
        return Err(QmpError::generic(format!("Invalid interval length: {bad}")));
    }
    let exports = running_exports(app)?;
    let export = exports
        .add(NewExport {
            id,
            node_name,
            name: args.opt_str("name")?,
            description: args.opt_str("description")?,
            writable,
            on_eject: None,
            allocation_depth,
            bitmaps,
        })
        .map_err(QmpError::generic)?;
    // QEMU's `stats-intervals` of a `-drive`: the export's backend is the
    // device-like user whose traffic query-blockstats shows.
    let now = exports.registry().clock().now_ns();
    for &seconds in &intervals {
        export.backend.stats().add_interval(seconds, now);
    }
    Ok(())
}

/// The export table, if the NBD server runs (QEMU's check in
/// `nbd_export_create`).
fn running_exports<C: NbdContext>(app: &C) -> Result<Rc<ExportTable>, QmpError> {
    let server = app.nbd_server();
    match server.exports() {
        Some(e) if server.running() => Ok(e),
        _ => Err(QmpError::generic("NBD server not running")),
    }
}

fn exports<C: NbdContext>(app: &C) -> Result<Rc<ExportTable>, QmpError> {
    app.nbd_server()
        .exports()
        .ok_or_else(|| QmpError::generic("NBD server not running"))
}

fn export_del<C: NbdContext>(app: &C, id: &str, mode: Option<&str>) -> Res {
    let exports = exports(app)?;
    let Some(e) = exports.by_id(id) else {
        return Err(QmpError::generic(format!("Export '{id}' is not found")));
    };
    if e.shutting_down.get() {
        return Err(QmpError::generic(format!(
            "Export '{id}' is already shutting down"
        )));
    }
    let hard = mode == Some("hard");
    if !hard && e.clients.get() > 0 {
        return Err(QmpError::generic(format!("export '{id}' still in use")));
    }
    e.request_shutdown(hard);
    exports.reap();
    Ok(json!({}))
}

fn nbd_server_start<C: NbdContext>(app: &mut C, args: &Args<'_>) -> Res {
    server_start(&mut *app.nbd_server(), &Obj::new(args.map()))?;
    Ok(json!({}))
}

fn nbd_server_stop<C: NbdContext>(app: &mut C, args: &Args<'_>) -> Res {
    args.check_known(&[])?;
    app.nbd_server().stop().map_err(QmpError::generic)?;
    Ok(json!({}))
}

fn block_export_add<C: NbdContext>(app: &mut C, args: &Args<'_>) -> Res {
    export_add(app, &Obj::new(args.map()))?;
    Ok(json!({}))
}

fn block_export_del<C: NbdContext>(app: &mut C, args: &Args<'_>) -> Res {
    let id = args.str("id")?;
    let mode = args.opt_enum_str("mode", &["safe", "hard"])?;
    args.check_known(&["id", "mode"])?;
    export_del(app, id, mode)
}

fn nbd_server_remove<C: NbdContext>(app: &mut C, args: &Args<'_>) -> Res {
    let name = args.str("name")?;
    let mode = args.opt_enum_str("mode", &["safe", "hard"])?;
    args.check_known(&["name", "mode"])?;
    export_del(app, name, mode)
}

/// Legacy `nbd-server-add`: `device` is a backend or node name; the id
/// and the NBD name default to it; a read-only node is quietly exported
/// read-only; an export of a named backend follows its medium (eject
/// shuts the export down).
fn nbd_server_add<C: NbdContext>(app: &mut C, args: &Args<'_>) -> Res {
    let device = args.str("device")?;
    let name = args.opt_str("name")?.unwrap_or(device);
    let description = args.opt_str("description")?;
    let writable = args.opt_bool("writable")?.unwrap_or(false);
    let bitmap = args.opt_str("bitmap")?;
    args.check_known(&["device", "name", "description", "writable", "bitmap"])?;
    let exports = running_exports(app)?;
    let reg = exports.registry().clone();
    let node = reg
        .lookup(Some(device), Some(device))
        .map_err(QmpError::generic)?;
    let node_name = String::from(node.name());
    exports
        .add(NewExport {
            id: name,
            node_name: &node_name,
            name: Some(name),
            description,
            writable: writable && !node.read_only(),
            on_eject: reg.find_backend(device),
            allocation_depth: false,
            bitmaps: bitmap
                .map(|b| alloc::vec![BitmapRef::Local(b.into())])
                .unwrap_or_default(),
        })
        .map_err(QmpError::generic)?;
    Ok(json!({}))
}

fn query_block_exports<C: NbdContext>(app: &mut C, args: &Args<'_>) -> Res {
    args.check_known(&[])?;
    let exports = app.nbd_server().exports();
    let list: Vec<Value> = match exports {
        Some(t) => t
            .all()
            .iter()
            .map(|e| {
                json!({
                    "type": "nbd",
                    "id": e.id,
                    "node-name": e.node_name,
                    "shutting-down": e.shutting_down.get(),
                    // blockhaus: the NBD clients connected (QEMU has no
                    // member for it; `x-` as for QEMU's unstable members).
                    "x-clients": e.clients.get(),
                })
            })
            .collect(),
        None => Vec::new(),
    };
    Ok(Value::Array(list))
}

/// `--nbd-server` and `--export` (keyval strings).
pub fn apply_boot_option<C: NbdContext>(
    app: &mut C,
    name: &str,
    value: &str,
) -> Result<bool, String> {
    let parse = |v: &str| crate::keyval::keyval_parse(v, None).map_err(|e| format!("{e}"));
    match name {
        "nbd-server" => {
            let map = parse(value)?;
            server_start(&mut *app.nbd_server(), &Obj::new(&map)).map_err(|e| e.desc)?;
            Ok(true)
        }
        "export" => {
            let map = parse(value)?;
            export_add(app, &Obj::new(&map)).map_err(|e| e.desc)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Registers the NBD QMP commands.
pub fn register<C: NbdContext + 'static>(commands: &mut Dispatcher<C>) {
    crate::schema::register(commands);
    commands.register(
        "nbd-server-start",
        Signature::new(
            "addr:{type:(inet|unix|vsock|fd), data:{host:str, port:str, numeric?:bool, to?:int, \
             ipv4?:bool, ipv6?:bool, keep-alive?:bool}}, tls-creds?:str, tls-authz?:str, \
             max-connections?:uint32, handshake-max-seconds?:uint32",
            "{}",
        ),
        nbd_server_start,
    );
    commands.register("nbd-server-stop", Signature::NONE, nbd_server_stop);
    commands.register(
        "nbd-server-add",
        Signature::new(
            "device:str, name?:str, description?:str, writable?:bool, bitmap?:str",
            "{}",
        ),
        nbd_server_add,
    );
    commands.register(
        "nbd-server-remove",
        Signature::new("name:str, mode?:(safe|hard)", "{}"),
        nbd_server_remove,
    );
    commands.register(
        "block-export-add",
        Signature::new(
            "type:(nbd|vhost-user-blk|fuse|vduse-blk), id:str, node-name:str, writable?:bool, \
             writethrough?:bool, iothread?:str, fixed-iothread?:bool, name?:str, \
             description?:str, bitmaps?:[any], allocation-depth?:bool, \
             x-stats-intervals?:[uint32]",
            "{}",
        ),
        block_export_add,
    );
    commands.register(
        "block-export-del",
        Signature::new("id:str, mode?:(safe|hard)", "{}"),
        block_export_del,
    );
    commands.register(
        "query-block-exports",
        Signature::new("", "[@BlockExportInfo]"),
        query_block_exports,
    );
}
